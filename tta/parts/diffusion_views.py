"""Generated views of a test image for DiffTPT (METHODS-VLM V.12): a pluggable generator.

A generator is any callable ``views(images, n) -> images``: ``images`` a ``(B, C, H, W)`` batch in [0, 1], the
result ``(B, n, C, h, w)`` in [0, 1] (any size: the caller resizes). :func:`generate` calls it with torch's
global random state forked and seeded, so a generator that draws from the global generator (as diffusers'
pipelines do without a ``generator`` argument) is reproducible from the adapter's seed and leaves the caller's
random state untouched.

The official generator is Stable Diffusion image variations (``lambdalabs/sd-image-variations-diffusers``,
revision v2.0) through ``diffusers``, guidance scale 3, the pipeline's other defaults (50 denoising steps, its
native 512 x 512 output), safety checker off. :class:`ImageVariations` wraps such a pipeline; its conditioning
input is the official one: the image resized to the pipeline's CLIP input size without crop (aspect ratio not
kept, bicubic without antialiasing) and normalised with CLIP's mean and std, handed over as a tensor, so the
pipeline's own feature extractor is bypassed. Weights are read from a local folder only (never downloaded).
``diffusers`` (with ``transformers``) is an optional extra, imported only here and only when used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingFileError
from ..imageops import CLIP_MEAN, CLIP_STD
from ..paths import data_root

SD_VARIATIONS = "lambdalabs/sd-image-variations-diffusers"
SD_REVISION = "v2.0"
SD_FOLDER = "sd-image-variations-diffusers"  # under <data root>/models
INSTALL = "pip install diffusers transformers (or pip install 'tta[diffusion]')"


def _import_pipeline():
    try:
        from diffusers import StableDiffusionImageVariationPipeline
    except ImportError as e:
        raise ConfigError(f"DiffTPT's Stable Diffusion generator needs the diffusers package ({e}): "
                          f"{INSTALL}") from None
    return StableDiffusionImageVariationPipeline


def is_diffusers_pipeline(obj) -> bool:
    """A diffusers pipeline object (told apart from a plain callable without importing diffusers)."""
    return type(obj).__module__.startswith("diffusers") and hasattr(obj, "image_encoder")


class ImageVariations:
    """``views(images, n)`` from a diffusers image-variation pipeline (see the module docstring)."""

    def __init__(self, pipeline, guidance_scale: float = 3.0, steps: int = 50):
        if not (isinstance(steps, int) and steps >= 1 and guidance_scale >= 0):
            raise ConfigError(f"diffusion steps must be an integer >= 1 and guidance_scale >= 0, got {steps!r}, "
                              f"{guidance_scale!r}")
        self.pipeline, self.guidance_scale, self.steps = pipeline, float(guidance_scale), steps
        pipeline.set_progress_bar_config(disable=True)
        for part in _modules(pipeline):  # generation is inference: a freshly built network is in train mode
            part.eval()
        size = pipeline.image_encoder.config.image_size
        self.size = int(size if isinstance(size, int) else size[0])

    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """The official conditioning input: resize to ``size x size`` (no crop), CLIP-normalise."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, n: int) -> torch.Tensor:
        cond = self.condition(images).to(self.pipeline.device)
        out = self.pipeline(cond, guidance_scale=self.guidance_scale, num_inference_steps=self.steps,
                            num_images_per_prompt=n, output_type="pt").images
        return out.to(images.device, images.dtype).view(len(images), n, *out.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageVariations({type(self.pipeline).__name__}, guidance_scale={self.guidance_scale}, "
                f"steps={self.steps})")


def load_image_variations(folder=None, *, dtype: str = "float32", device=None, data_dir=None):
    """The Stable Diffusion image-variations pipeline from a local diffusers folder (``model_index.json`` and its
    sub-folders): ``folder``, else ``<data root>/models/sd-image-variations-diffusers``. Nothing is downloaded."""
    folder = Path(folder).expanduser() if folder else data_root(data_dir) / "models" / SD_FOLDER
    if not (folder / "model_index.json").is_file():
        raise MissingFileError(
            f"Stable Diffusion image-variation weights not found in {folder} (no model_index.json): place the "
            f"diffusers folder of {SD_VARIATIONS} (revision {SD_REVISION}) there, or pass "
            f"diffusion_weights=<folder>; set TTA_DATA_DIR to choose the data root. Or pass "
            f"generator=<callable views(images, n)>")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"diffusion_dtype must be float32, float16 or bfloat16, got {dtype!r}")
    pipe = _import_pipeline().from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                              requires_safety_checker=False)
    for part in _modules(pipe):  # cast here: the loader's dtype keyword changed name across diffusers versions
        part.to(device=device, dtype=getattr(torch, dtype))
    return pipe


def _modules(pipeline) -> list:
    """The networks of a diffusers pipeline (UNet, VAE, image encoder, ...)."""
    return [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]


def build_generator(generator, *, weights=None, guidance_scale: float = 3.0, steps: int = 50, dtype: str = "float32",
                    device=None) -> Optional[Callable]:
    """``views(images, n)`` from ``generator``: ``"sd_image_variations"`` (the official pipeline, loaded from
    ``weights``), a diffusers pipeline object (wrapped with the guidance and step options), any other callable
    (used as it is), or None (no generated views)."""
    if generator is None:
        return None
    if isinstance(generator, str):
        if generator != "sd_image_variations":
            raise ConfigError(f"generator must be 'sd_image_variations', a diffusers pipeline, a callable "
                              f"views(images, n) or None; got {generator!r}")
        generator = load_image_variations(weights, dtype=dtype, device=device)
    if is_diffusers_pipeline(generator):
        return ImageVariations(generator, guidance_scale, steps)
    if not callable(generator):
        raise ConfigError(f"generator must be callable as views(images, n), got {type(generator).__name__}")
    return generator


def generate(fn: Callable, images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``fn(images, n)`` under a forked global random state seeded with ``seed``; checked to be ``(B, n, C, h, w)``."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = fn(images, n)
    if not (isinstance(out, torch.Tensor) and out.dim() == 5 and out.shape[:3] == (len(images), n, images.shape[1])
            and out.is_floating_point()):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the view generator must return a float tensor (B, n, C, h, w) = ({len(images)}, {n}, "
                          f"{images.shape[1]}, h, w) of images in [0, 1], got {got}")
    return out


__all__ = ["SD_VARIATIONS", "SD_REVISION", "ImageVariations", "load_image_variations", "build_generator", "generate",
           "is_diffusers_pipeline"]
