"""Input prompt tokens for a timm Vision Transformer, and its class token read after every block
(FOA, METHODS-ZOO Z.15).

``PromptedViT(model)`` wraps a timm ``VisionTransformer`` (inside tta's normalising wrapper or bare).
``features(x, prompts)`` runs it with ``prompts`` (P, n, D) inserted right after the class token, after
the position embedding (prompts get no position embedding), P candidate prompt sets at once: the patch
embedding is computed once for the batch and shared by every candidate, only the blocks run P times.
It returns, per candidate and image, the class token after block l normalised by block l+1's ``norm1``
(by the final norm after the last block), concatenated over the L blocks (L*D values), and the logits
``head(fc_norm(last))``. Without prompts it is the plain model (``logits == model(x)``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError


def _vit(model: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The timm VisionTransformer inside ``model`` and the normalising wrapper around it (or None)."""
    net = getattr(model, "net", model)
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "head", "num_prefix_tokens")
    if not all(hasattr(net, a) for a in needed) or getattr(net, "global_pool", None) != "token" \
            or net.num_prefix_tokens < 1 or not all(hasattr(b, "norm1") for b in net.blocks):
        raise ConfigError(f"prompt tokens need a timm VisionTransformer with a class token and token pooling "
                          f"(tta.models.load('timm:vit_base_patch16_224')), got {type(net).__name__}")
    return net, (model if net is not model else None)


class PromptedViT(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        vit, wrapper = _vit(model)
        object.__setattr__(self, "vit", vit)  # already registered through self.model
        object.__setattr__(self, "wrapper", wrapper)
        self.dim = vit.embed_dim
        self.depth = len(vit.blocks)

    def init_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """VPT's initialisation: uniform in +-sqrt(6 / (3 * patch_area + D)) (xavier on the patch projection)."""
        ph, pw = self.vit.patch_embed.patch_size
        v = math.sqrt(6.0 / (3 * ph * pw + self.dim))
        return (torch.rand(n, self.dim, generator=generator) * 2 - 1) * v

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        w = self.wrapper
        return x if w is None else (x - w.mean) / w.std

    @torch.no_grad()
    def features(self, x: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(phi, logits)``: shapes (P, B, L*D) and (P, B, C), P = 1 without prompts."""
        vit = self.vit
        h = vit._pos_embed(vit.patch_embed(self._normalise(x)))  # (B, T, D)
        p = 1 if prompts is None else len(prompts)
        b = len(x)
        if prompts is not None:
            pr = prompts.to(h).unsqueeze(1).expand(-1, b, -1, -1).reshape(p * b, -1, self.dim)
            h = h.repeat(p, 1, 1)
            h = torch.cat([h[:, :1], pr, h[:, 1:]], 1)
        h = vit.norm_pre(vit.patch_drop(h))
        taps = []
        for i, block in enumerate(vit.blocks):
            h = block(h)
            norm = vit.blocks[i + 1].norm1 if i + 1 < self.depth else vit.norm
            taps.append(norm(h[:, 0]))
        last = taps[-1]
        logits = vit.head(vit.head_drop(vit.fc_norm(last)))
        return torch.cat(taps, 1).view(p, b, -1), logits.view(p, b, -1)

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """Logits from (shifted) final class-token features."""
        vit = self.vit
        return vit.head(vit.head_drop(vit.fc_norm(last)))
