"""Corruption engine: the 15 CIFAR-10-C / ImageNet-C corruptions plus the 4 extras, batched in torch.

    from tta.data import corruptions as C
    y = C.fog(x, 5, generator=g)                  # functional op, x: (N, 3, H, W) float in [0, 1]
    y = C.corrupt(x, "fog", 5, seed=0)            # dispatcher
    y = C.Corrupt("fog", 5, seed=0)(x)            # transform
    u8 = C.corrupt_dataset(images_u8, "fog", 5, seed=0)   # whole data sets, seeded per fixed chunk

The operations follow the reference generators (hendrycks/robustness ``make_cifar_c.py`` and
``make_imagenet_c.py``) as described in docs/METHODS.md section 4, with their quirks (truncating uint8
casts, glass-blur copy-not-swap, float arange zoom lists, frost1-5 only, fog noise ~ wibble^2).
Deviations are listed in each module's docstring: the random generator (torch, seeded, instead of
NumPy's unseeded global state), ImageMagick motion blur replaced by its exact kernel model
(motion.py), frost JPEGs decoded by Pillow (frost.py), float64 everywhere (the reference uses float32
in snow, frost blending inputs and elastic_transform; our normal draws are float32, then converted).

Speed (issue 3): fixed linear filters on small images run as cached sparse operators (``_core``),
brightness as a 256 x 256 table, shot noise by inverse-CDF lookup, JPEG through torchvision's libjpeg ops
when they give Pillow's exact pixels; tests/test_corruptions_fastpaths.py checks each against the direct
code or the exact distribution.
"""
from .api import (ALL_CORRUPTIONS, CORRUPTIONS, DETERMINISTIC, EXTRA_CORRUPTIONS, OPS, Corrupt,
                  corrupt)
from .dataset import RNG_CHUNK, chunk_seed, corrupt_dataset

gaussian_noise = OPS["gaussian_noise"]
shot_noise = OPS["shot_noise"]
impulse_noise = OPS["impulse_noise"]
defocus_blur = OPS["defocus_blur"]
glass_blur = OPS["glass_blur"]
motion_blur = OPS["motion_blur"]
zoom_blur = OPS["zoom_blur"]
snow = OPS["snow"]
frost = OPS["frost"]
fog = OPS["fog"]
brightness = OPS["brightness"]
contrast = OPS["contrast"]
elastic_transform = OPS["elastic_transform"]
pixelate = OPS["pixelate"]
jpeg_compression = OPS["jpeg_compression"]
speckle_noise = OPS["speckle_noise"]
gaussian_blur = OPS["gaussian_blur"]
spatter = OPS["spatter"]
saturate = OPS["saturate"]

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "ALL_CORRUPTIONS", "DETERMINISTIC", "Corrupt", "corrupt",
           "corrupt_dataset", "RNG_CHUNK", "chunk_seed", *ALL_CORRUPTIONS]
