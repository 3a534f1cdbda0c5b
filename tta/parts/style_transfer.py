"""AdaIN style transfer for GTTA's ImageNet variant (METHODS-ZOO Z.12, "ImageNet variant").

GTTA's intermediate domain on ImageNet is made by re-rendering labelled source images in the style of the
test images: a frozen encoder's channel moments (mean, std per channel) of the test images replace those
of the source images (AdaIN, Huang & Belongie 2017) and a trainable decoder turns the result back into an
image. The decoder is pre-trained on source images with source moments (once, cached on disk) and keeps
learning with one step per test batch, so it follows the test styles it is asked to render.

What the spec leaves open ([gap]) and what we chose, following the released reference where it is clear:

* encoder: torchvision VGG-19 (IMAGENET1K_V1), ImageNet normalisation inside, up to relu4_1 (content
  layer); moments are matched at relu1_2 and relu4_1 (the reference's "fm11" is the output of its fifth
  module, after conv1_2, i.e. relu1_2, although its comments say relu1_1). The encoder is pluggable: any
  :class:`StyleEncoder` (stages whose outputs are the moment layers, the last one the content layer).
* decoder (:class:`AdaINDecoder`): the mirror of the encoder (reflect padding, nearest upsampling) as in
  the reference; AdaIN is applied at the content layer and, as a skip connection added at full resolution,
  at the first moment layer; sigmoid output, so renders lie in (0, 1).
* moments: per image and channel, mean and ``sqrt(unbiased var + eps)`` (eps 1e-5 inside the root keeps
  the gradient of a dead channel's std finite; the reference adds eps outside the root).
* loss: ``MSE(enc(g)_content, AdaIN output) + style_weight * sum_l [MSE(mean_l(g), mean_l^s) +
  MSE(std_l(g), std_l^s)]`` over the moment layers, style_weight 0.1; Adam 1e-4 on the decoder.
* pre-training: the moments of up to ``buffer_size`` (100,000) source images form a bank; each step takes
  the next source batch as content and style moments drawn uniformly from the bank (seeded generator).
  The decoder starts from a seeded initialisation (seed 0). The result is cached under
  ``tta.paths.cache_dir()/gtta_adain`` with a key on the encoder weights, the decoder's initial weights and
  architecture, the source images and every pre-training setting; test-time Adam starts fresh either way,
  so a cached and a freshly trained run are identical.
* test time: the moments of each test batch go to a buffer of at most ``buffer_size`` entries (oldest
  dropped). As in the reference, the decoder step and the rendering both use the *latest* B moments
  (B = the source batch), paired in order, and the decoder step takes its own source batch (GTTA draws
  two source batches per test batch in this variant).
"""
from __future__ import annotations

import hashlib
import logging
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .source import SourceBatches, as_float

log = logging.getLogger(__name__)

VGG19_STAGES = (4, 21)  # torchvision vgg19.features[:4] ends at relu1_2, [4:21] at relu4_1


class StyleEncoder(nn.Module):
    """A frozen encoder whose ``forward(x)`` returns the feature maps after each stage: the layers whose
    moments are matched, shallow to deep, the last one also the content layer AdaIN works on.
    ``mean``/``std``: input normalisation applied first (images arrive in [0, 1])."""

    def __init__(self, stages: Sequence[nn.Module], mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        if len(stages) < 1:
            raise ConfigError("a style encoder needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.requires_grad_(False)
        self.eval()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode


def vgg19_encoder(weights: str = "IMAGENET1K_V1") -> StyleEncoder:
    """torchvision's VGG-19 up to relu4_1, moments at relu1_2 and relu4_1. The weights come through
    :func:`tta.models.hub.load_torchvision` (torch hub cache; one MissingFileError naming the file and the
    folder when they are absent and cannot be downloaded)."""
    from ..models.hub import load_torchvision
    net = load_torchvision("vgg19", weights=weights)
    features = net.net.features
    stages = [features[a:b] for a, b in zip((0,) + VGG19_STAGES[:-1], VGG19_STAGES)]
    return StyleEncoder(stages, net.mean.flatten().tolist(), net.std.flatten().tolist())


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")


class AdaINDecoder(nn.Module):
    """The encoder's mirror. ``widths`` deep to shallow; block i has ``repeats[i]`` conv+ReLU, the last of
    them mapping ``widths[i] -> widths[i+1]``, then a 2x nearest upsampling; the AdaIN-ed first moment layer
    is added (skip), then the last block's ``repeats[-1]`` conv+ReLU at ``widths[-1]``, a conv to
    ``out_channels`` and a sigmoid. The defaults mirror VGG-19 up to relu4_1 (the reference's decoder)."""

    def __init__(self, widths: Sequence[int] = (512, 256, 128, 64), repeats: Sequence[int] = (1, 4, 2, 1),
                 out_channels: int = 3):
        super().__init__()
        if len(widths) != len(repeats) or len(widths) < 1 or min(repeats) < 1:
            raise ConfigError(f"AdaINDecoder needs one repeat count >= 1 per width, got {widths}, {repeats}")
        body: List[nn.Module] = []
        for i in range(len(widths) - 1):
            for r in range(repeats[i]):
                body += [_conv(widths[i], widths[i + 1] if r == repeats[i] - 1 else widths[i]), nn.ReLU()]
            body.append(nn.Upsample(scale_factor=2, mode="nearest"))
        head: List[nn.Module] = []
        for _ in range(repeats[-1]):
            head += [_conv(widths[-1], widths[-1]), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Sequential(*head, _conv(widths[-1], out_channels), nn.Sigmoid())

    def forward(self, content: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.body(content)
        return self.head(h if skip is None else h + skip)


def seeded_decoder(seed: int = 0, **kwargs) -> AdaINDecoder:
    """An :class:`AdaINDecoder` whose random initialisation does not depend on (nor move) the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AdaINDecoder(**kwargs)


def channel_moments(f: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and ``sqrt(unbiased variance + eps)`` over the spatial positions."""
    flat = f.flatten(2)
    return flat.mean(2), (flat.var(2, unbiased=True) + eps).sqrt()


def adain(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``std_s * (f - mean(f)) / std(f) + mean_s`` per image and channel (``mean``, ``std``: (N, C))."""
    m, s = channel_moments(f, eps)
    return (f - m[..., None, None]) / s[..., None, None] * std[..., None, None] + mean[..., None, None]


class MomentBuffer:
    """The latest ``capacity`` rows of flattened moments, oldest dropped first. Storage grows geometrically
    up to the capacity, so a short stream does not pay for 100,000 rows."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ConfigError(f"moment buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self._data: Optional[torch.Tensor] = None
        self._count = 0  # rows ever appended

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach()[-self.capacity:]
        need = min(self.capacity, self._count + len(rows))
        size = 0 if self._data is None else len(self._data)
        if size < need:  # grows only before the first wrap-around, so rows keep their slots
            data = rows.new_empty((min(self.capacity, max(need, 2 * size)), rows.shape[1]))
            if size:
                data[:size] = self._data
            self._data = data
        self._data[self._slots(self._count, len(rows))] = rows
        self._count += len(rows)

    def _slots(self, start: int, n: int) -> torch.Tensor:
        return (torch.arange(start, start + n) % self.capacity).to(self._data.device)

    def latest(self, n: int) -> torch.Tensor:
        """The ``n`` most recent rows, oldest first."""
        if not 0 < n <= len(self):
            raise ValueError(f"asked for the latest {n} moments, the buffer holds {len(self)}")
        return self._data[self._slots(self._count - n, n)]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` rows drawn uniformly with replacement (indices from the CPU ``generator``)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        return self._data[idx.to(self._data.device)]


class StyleTransfer(nn.Module):
    """Encoder + decoder + the test moment buffer (module docstring). Moments travel as one flat row per
    image: ``[mean_1, std_1, mean_2, std_2, ...]`` over the encoder's moment layers."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, lr: float = 1e-4, style_weight: float = 0.1,
                 buffer_size: int = 100_000, eps: float = 1e-5):
        super().__init__()
        self.encoder, self.decoder = encoder.requires_grad_(False), decoder
        self.lr, self.style_weight, self.eps = lr, style_weight, eps
        self.buffer = MomentBuffer(buffer_size)
        self.from_cache = False
        self.reset()

    def reset(self) -> None:
        """Empty test buffer and fresh decoder optimizer (the decoder weights are the adapter's to restore)."""
        self.buffer.clear()
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)

    # ------------------------------------------------------------------------------------ moments
    def _flat(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t for f in feats for t in channel_moments(f, self.eps)], 1)

    def _split(self, flat: torch.Tensor, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Flat rows back to ``[mean_1, std_1, ...]`` with the channel counts of ``feats``."""
        return list(flat.split([f.shape[1] for f in feats for _ in (0, 1)], dim=1))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._flat(self.encoder(x))

    def remember(self, x: torch.Tensor) -> None:
        """Append the moments of a test batch to the buffer."""
        self.buffer.append(self.moments(x))

    # ------------------------------------------------------------------------------------ transfer
    def _generate(self, feats: Sequence[torch.Tensor], style: torch.Tensor):
        s = self._split(style, feats)
        content = adain(feats[-1], s[-2], s[-1], self.eps)
        skip = adain(feats[0], s[0], s[1], self.eps) if len(feats) > 1 else None
        return self.decoder(content, skip), content, s

    def render(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``x`` re-rendered with the moment rows ``style`` (one per image), without gradients."""
        with torch.no_grad():
            return self._generate(self.encoder(x), style)[0]

    def losses(self, x: torch.Tensor, style: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(content loss, style loss) of rendering ``x`` with ``style``; gradients reach the decoder."""
        with torch.no_grad():
            feats = self.encoder(x)
        image, target, s = self._generate(feats, style)
        out = self.encoder(image)
        content = F.mse_loss(out[-1], target)
        got = self._split(self._flat(out), out)
        return content, sum(F.mse_loss(g, t) for g, t in zip(got, s))

    def step(self, x: torch.Tensor, style: torch.Tensor) -> float:
        """One Adam step of the decoder on ``content + style_weight * style``; returns the loss."""
        content, style_loss = self.losses(x, style)
        loss = content + self.style_weight * style_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ------------------------------------------------------------------------------------ pre-training
    def pretrain(self, images: torch.Tensor, steps: int, batch_size: int, seed: int = 0, cache: bool = True) -> None:
        """``steps`` decoder steps on source ``images`` (uint8 or float NCHW) with source moments; loaded
        from the disk cache instead when the same pre-training was done before (module docstring)."""
        from ..paths import cache_dir
        if steps <= 0:
            return
        path = cache_dir() / "gtta_adain" / f"decoder-{self._cache_key(images, steps, batch_size, seed)}.pt"
        if cache and path.is_file():
            self.decoder.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            self.from_cache = True
            return
        log.info("pre-training the GTTA style-transfer decoder for %d steps (cached at %s)", steps, path)
        device, generator = self.device, torch.Generator().manual_seed(seed)
        bank = MomentBuffer(min(len(images), self.buffer.capacity))
        batches = SourceBatches(images, None, batch_size, seed)
        for chunk in torch.randperm(len(images), generator=generator)[:bank.capacity].split(batch_size):
            bank.append(self.moments(as_float(images[chunk].to(device))))
        recent = []
        for i in range(1, steps + 1):
            x, _ = batches.next(device)
            recent.append(self.step(x, bank.sample(len(x), generator)))
            if i % 1000 == 0 or i == steps:
                log.info("decoder pre-training step %d/%d: mean loss %.4f", i, steps, sum(recent) / len(recent))
                recent = []
        self.reset()
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.decoder.state_dict(), tmp)
            tmp.replace(path)

    def _cache_key(self, images: torch.Tensor, steps: int, batch_size: int, seed: int) -> str:
        h = hashlib.sha256(repr(("gtta-adain-v1", steps, batch_size, seed, self.lr, self.style_weight, self.eps,
                                 self.buffer.capacity, str(self.encoder), str(self.decoder),
                                 tuple(images.shape), str(images.dtype))).encode())
        tensors = [*self.encoder.state_dict().items(), *self.decoder.state_dict().items(), ("images", images)]
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
        return h.hexdigest()[:24]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device
