"""Text classifiers for CLIP from per-class prompt lists (METHODS-VLM V.15.1), shared by the CLIP methods.

``w_c = normalize(mean_p normalize(E_T(prompt_{c,p})))``: every prompt of a class is encoded and normalised,
the class embedding is their re-normalised mean (the formula of ``ZeroShotClassifier.refresh_text``, here
for any per-class prompt lists, so CuPL-style sentences and per-class prompt counts work too). WATT's
per-template classifiers and TPS-style concept sets need the individual embeddings: ``per_prompt=True``
keeps them, shaped ``(C, P, D)``.

open_clip's tokenizer cuts a prompt longer than the context silently; here that is one
:class:`ConfigError` naming the prompt, so a long description is never classified by its first 77 tokens.

Prompt sets: our own small sets (``watt8``: WATT's 8 templates; ``clipartt``: CLIPArTT's prompt, no final
period) are looked up first, then the named sets of ``clip_templates.json`` through
:func:`tta.models.clip.prompt_templates`; a list of strings with ``{}`` is taken as it is.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .clip import prompt_templates

PROMPT_SETS = {
    # Mehrdad-Noori/WATT templates.yaml (the first two without a final period), in its order
    "watt8": ["a photo of a {}", "itap of a {}", "a bad photo of the {}.", "a origami {}.",
              "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
    "clipartt": ["a photo of a {}"],  # dosowiechi/CLIPArTT: no final period
}


def prompt_set(templates: Union[str, Sequence[str]]) -> List[str]:
    """A named prompt set (ours, then the bundled JSON's) or a list of templates each containing ``{}``."""
    if isinstance(templates, str) and templates in PROMPT_SETS:
        return list(PROMPT_SETS[templates])
    try:
        return prompt_templates(templates)
    except ConfigError as e:
        if not isinstance(templates, str):
            raise
        raise ConfigError(f"{e} (or one of this module's sets: {sorted(PROMPT_SETS)})") from None


def template_prompts(classnames: Sequence[str], templates: Sequence[str]) -> List[List[str]]:
    """Per-class prompt lists: every template formatted with every class name."""
    return [[t.format(c) for t in templates] for c in classnames]


def context_length(text_encoder: nn.Module) -> int:
    """How many tokens the text tower reads (the rows of its positional embedding)."""
    return int(text_encoder.positional_embedding.shape[0])


def tokenize(tokenizer, texts: Sequence[str], length: int) -> torch.Tensor:
    """``(N, length)`` tokens; a prompt that does not fit is one clear error instead of a silent cut.

    A prompt fits iff tokenizing it for one more position changes none of the first ``length`` tokens
    (a cut prompt ends in an end-of-text token the longer tokenization does not have there).
    """
    texts = list(texts)
    tokens = tokenizer(texts, context_length=length)
    longer = tokenizer(texts, context_length=length + 1)
    cut = (longer[:, :length] != tokens).any(1)
    if cut.any():
        i = int(cut.nonzero()[0])
        raise ConfigError(f"{int(cut.sum())} prompt(s) longer than the text encoder's {length} tokens, e.g. "
                          f"{texts[i]!r}; shorten them (they would be cut silently)")
    return tokens


def encode_tokens(text_encoder: nn.Module, tokens: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """L2-normalised text embeddings ``(N, D)``, ``chunk`` prompts per forward. Differentiable: run it under
    ``torch.no_grad()`` unless the text tower adapts."""
    return torch.cat([F.normalize(text_encoder(tokens[i:i + chunk]), dim=-1) for i in range(0, len(tokens), chunk)])


def pool(features: torch.Tensor, counts: Sequence[int], per_prompt: bool = False) -> torch.Tensor:
    """Class embeddings from the normalised prompt embeddings of ``counts[c]`` prompts per class, in class
    order: their re-normalised mean ``(C, D)``, or, with ``per_prompt``, the embeddings ``(C, P, D)``."""
    counts = list(counts)
    if per_prompt:
        if len(set(counts)) != 1:
            raise ConfigError(f"per-prompt class embeddings need the same number of prompts for every class, "
                              f"got counts {sorted(set(counts))}")
        return features.view(len(counts), counts[0], -1)
    if len(set(counts)) == 1:
        return F.normalize(features.view(len(counts), counts[0], -1).mean(1), dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=features.device),
                                    torch.tensor(counts, device=features.device))
    sums = features.new_zeros(len(counts), features.shape[1]).index_add_(0, owner, features)
    return F.normalize(sums / torch.tensor(counts, device=features.device, dtype=features.dtype)[:, None], dim=-1)


def class_text_features(text_encoder: nn.Module, tokenizer, prompts: Sequence[Sequence[str]],
                        per_prompt: bool = False, chunk: int = 1000) -> torch.Tensor:
    """Class embeddings from per-class prompt lists (see the module docstring); no gradient."""
    counts = [len(p) for p in prompts]
    if not counts or min(counts) == 0:
        raise ConfigError("every class needs at least one prompt")
    device = text_encoder.positional_embedding.device
    tokens = tokenize(tokenizer, [t for p in prompts for t in p], context_length(text_encoder)).to(device)
    with torch.no_grad():
        return pool(encode_tokens(text_encoder, tokens, chunk), counts, per_prompt)


def classifier_text(classifier: nn.Module, templates: Union[str, Sequence[str]],
                    per_prompt: bool = False) -> torch.Tensor:
    """The class embeddings of a :class:`~tta.models.clip.ZeroShotClassifier`'s classes under other templates
    (its own text tower and tokenizer): ``(C, D)``, or ``(C, T, D)`` with ``per_prompt``."""
    if not hasattr(classifier, "text") or not hasattr(classifier, "classnames"):
        raise ConfigError("expected a CLIP zero-shot classifier (tta.models.load('openclip:...'))")
    prompts = template_prompts(classifier.classnames, prompt_set(templates))
    return class_text_features(classifier.text, classifier.tokenizer, prompts, per_prompt)


__all__ = ["PROMPT_SETS", "prompt_set", "template_prompts", "context_length", "tokenize", "encode_tokens", "pool",
           "class_text_features", "classifier_text"]
