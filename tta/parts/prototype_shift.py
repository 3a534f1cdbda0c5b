"""TPS's class prototypes and their per-image shift (METHODS-VLM V.8, V.15.5).

Prototypes are built once, offline in the official code (pickles), here at construction from the classifier's
own text tower; the text encoder never runs during adaptation:

* template prototype ``P^T_c``: the mean of the L2-normalised embeddings of every template filled with the
  class name (CLIP's 80 ImageNet templates in the official runs), NOT re-normalised;
* concept prototype ``P^D_c``: the same mean over the class's descriptor prompts ``"<class>, <sentence>"``
  (:func:`descriptor_sentence` turns a GPT-4 descriptor into the sentence);
* ``micro`` (the main variant): ``(P^D_c + P^T_c) / 2``; ``macro``: the mean weighted by the prompt counts
  ``(n_D P^D_c + n_T P^T_c) / (n_D + n_T)``, i.e. the plain mean over all the class's prompts.

At test time a zero-initialised shift ``Delta`` (one row per class, or one row shared by all classes) moves the
prototypes: ``t_c = normalise(normalise(P_c) + Delta_c)``; only ``Delta`` is adapted.

Descriptor files are not shipped (the official ``gpt4_descriptors/*.json``: ``{class name: [descriptor, ...]}``).
Pairing (paper vs official code): the official script zips the data set's class list with the JSON's keys BY
POSITION, so a reordered or renamed file silently gives classes other classes' descriptors; here descriptors are
looked up by class name (``pair_by="name"``, a missing class is one error), ``pair_by="position"`` reproduces the
official pairing (the numbers of classes and keys must match).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MissingFileError
from ..models.clip_text import context_length, encode_tokens, prompt_set, template_prompts, tokenize

PROTOTYPES = ("template", "concept", "micro", "macro")
PAIRINGS = ("name", "position")
SHIFTS = ("per_class", "shared")
_VERB_STARTS = ("has", "often", "typically", "may", "can")


def descriptor_sentence(descriptor: str) -> str:
    """The official descriptor-to-sentence rule (after Menon & Vondrick's descriptor strings): ``"which is D"``
    if D starts with the letter "a" (any word: the rule tests the first character) or with "used", ``"which D"``
    if it starts with has/often/typically/may/can, else ``"which has D"``."""
    if descriptor.startswith("a") or descriptor.startswith("used"):
        return f"which is {descriptor}"
    if descriptor.startswith(_VERB_STARTS):
        return f"which {descriptor}"
    return f"which has {descriptor}"


def load_descriptors(source: Union[str, Path, Mapping[str, Sequence[str]]]) -> Dict[str, List[str]]:
    """``{class name: [descriptor, ...]}`` from a mapping or a JSON file of that shape."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MissingFileError(f"descriptor file {path} not found: expected a JSON object {{class name: "
                                   f"[descriptor, ...]}} (TPS's gpt4_descriptors/<data set>-gpt4.json)")
        source = json.loads(path.read_text())
    if not isinstance(source, Mapping) or not all(
            isinstance(v, (list, tuple)) and v and all(isinstance(d, str) for d in v) for v in source.values()):
        raise ConfigError("descriptors must map every class name to a non-empty list of descriptor strings")
    return {str(k): list(v) for k, v in source.items()}


def concept_prompts(classnames: Sequence[str], descriptors: Mapping[str, Sequence[str]],
                    pair_by: str = "name") -> List[List[str]]:
    """Per-class prompts ``"<class>, <descriptor sentence>"`` (see the module docstring for ``pair_by``)."""
    if pair_by not in PAIRINGS:
        raise ConfigError(f"pair_by must be one of {PAIRINGS}, got {pair_by!r}")
    if pair_by == "position":
        if len(descriptors) != len(classnames):
            raise ConfigError(f"pair_by='position' needs one descriptor entry per class: {len(classnames)} classes, "
                              f"{len(descriptors)} entries")
        lists = list(descriptors.values())
    else:
        missing = [c for c in classnames if c not in descriptors]
        if missing:
            raise ConfigError(f"no descriptors for {len(missing)} class(es), e.g. {missing[:3]} (pair_by='position' "
                              f"pairs the file's entries with the classes in order, as the official code does)")
        lists = [descriptors[c] for c in classnames]
    return [[f"{c}, {descriptor_sentence(d)}" for d in ds] for c, ds in zip(classnames, lists)]


def prompt_means(classifier: nn.Module, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(C, D)`` per class, the mean of its prompts' L2-normalised embeddings, not re-normalised (no gradient)."""
    counts = [len(p) for p in prompts]
    text = classifier.text
    tokens = tokenize(classifier.tokenizer, [t for p in prompts for t in p], context_length(text))
    with torch.no_grad():
        features = encode_tokens(text, tokens.to(text.positional_embedding.device))
    return torch.stack([f.mean(0) for f in features.split(counts)])


def mix_prototypes(template: torch.Tensor, concept: torch.Tensor, mode: str = "micro",
                   template_count: int = 80, concept_counts: Sequence[int] = ()) -> torch.Tensor:
    """``micro``: ``(P^D + P^T) / 2``; ``macro``: ``(n_D P^D + n_T P^T) / (n_D + n_T)`` per class."""
    if mode == "micro":
        return (concept + template) / 2
    if mode == "macro":
        n_d = torch.as_tensor(list(concept_counts), dtype=template.dtype, device=template.device).view(-1, 1)
        return (n_d * concept + template_count * template) / (n_d + template_count)
    raise ConfigError(f"mix mode must be 'micro' or 'macro', got {mode!r}")


def class_prototypes(classifier: nn.Module, mode: str = "template", templates="clip80", descriptors=None,
                     pair_by: str = "name") -> torch.Tensor:
    """``(C, D)`` un-normalised prototypes ``P_c`` of the classifier's classes (see the module docstring)."""
    if mode not in PROTOTYPES:
        raise ConfigError(f"prototypes must be one of {PROTOTYPES}, got {mode!r}")
    if mode != "template" and descriptors is None:
        raise ConfigError(f"prototypes={mode!r} needs descriptors (a JSON file or mapping {{class: [descriptor, "
                          f"...]}}, e.g. TPS's gpt4_descriptors/<data set>-gpt4.json); prototypes='template' "
                          f"needs none")
    names = list(classifier.classnames)
    template_list = prompt_set(templates)
    template = None if mode == "concept" else prompt_means(classifier, template_prompts(names, template_list))
    if mode == "template":
        return template
    prompts = concept_prompts(names, load_descriptors(descriptors), pair_by)
    concept = prompt_means(classifier, prompts)
    if mode == "concept":
        return concept
    return mix_prototypes(template, concept, mode, len(template_list), [len(p) for p in prompts])


def shift_prototypes(prototypes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``normalise(normalise(P) + Delta)``: ``shift`` (C, D) per class, or (D,) shared by every class."""
    return F.normalize(F.normalize(prototypes, dim=-1) + shift, dim=-1)


class ShiftedPrototypes(nn.Module):
    """A CLIP classifier whose class embeddings are fixed prototypes plus a learnable ``shift`` (zeros at start,
    so the start is the zero-shot classifier of those prototypes)."""

    def __init__(self, classifier: nn.Module, prototypes: torch.Tensor, shift: str = "per_class"):
        super().__init__()
        if shift not in SHIFTS:
            raise ConfigError(f"shift must be one of {SHIFTS}, got {shift!r}")
        self.classifier = classifier
        self.register_buffer("prototypes", prototypes.detach().clone(), persistent=False)
        self.shift = nn.Parameter(torch.zeros(prototypes.shape if shift == "per_class" else prototypes.shape[-1:],
                                              dtype=prototypes.dtype, device=prototypes.device))

    def text_features(self) -> torch.Tensor:
        return shift_prototypes(self.prototypes, self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits_from_features(self.classifier.encode_image(x), self.text_features())


__all__ = ["PROTOTYPES", "PAIRINGS", "SHIFTS", "descriptor_sentence", "load_descriptors", "concept_prompts",
           "prompt_means", "mix_prototypes", "class_prototypes", "shift_prototypes", "ShiftedPrototypes"]
