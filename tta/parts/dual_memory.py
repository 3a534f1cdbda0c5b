"""DMN's dynamic-memory read-out (METHODS-VLM V.3 step 4): attention over a class's stored test features
plus its text embedding, which is always present as one more slot.

For a query ``q`` and class c with slots ``k_{c,1..L}`` (L2-normalised stored features; empty slots add nothing)
and ``k_{c,L+1} = w_c``: ``a_{c,j} = exp(-beta (1 - q . k_{c,j}))``,
``proto_c = normalize(sum_j a_{c,j} k_{c,j})`` (keys are the values), and the memory logits are
``s q . proto_c``. The text slot keeps a class that has no stored feature yet at its zero-shot prototype;
once image slots with high cosine exist its weight is small (``exp(-5.5 (1 - 0.3)) ~ 0.02``).

The stored features must already be unit vectors (DMN stores the encoder's normalised output): the read-out
does not re-normalise them, which would cost a pass over the whole ``C x L x D`` memory (100 MB for ImageNet)
per image for a change in the last bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import ClassCache


def attention_prototypes(queries: torch.Tensor, memory: ClassCache, text: torch.Tensor, beta: float) -> torch.Tensor:
    """``(B, C, D)``: each query's attention prototype of every class (see the module docstring)."""
    text = text.to(queries)
    a_text = torch.exp(-beta * (1 - queries @ text.t()))  # (B, C)
    proto = a_text.unsqueeze(-1) * text
    if memory.keys is not None:
        keys = memory.keys.to(queries)
        a = torch.exp(-beta * (1 - torch.einsum("bd,cld->bcl", queries, keys))) * memory.valid.to(queries)
        proto = proto + torch.einsum("bcl,cld->bcd", a, keys)
    return F.normalize(proto, dim=-1)


def memory_logits(queries: torch.Tensor, memory: ClassCache, text: torch.Tensor, beta: float,
                  scale: float) -> torch.Tensor:
    """``s q . proto_c``, (B, C): DMN's memory classifier (before its softmax)."""
    return scale * torch.einsum("bd,bcd->bc", queries, attention_prototypes(queries, memory, text, beta))


__all__ = ["attention_prototypes", "memory_logits"]
