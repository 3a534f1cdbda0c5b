"""COME (Zhang et al., ICLR 2025; METHODS-ZOO Z.14): conservatively minimise entropy. The Shannon
entropy of a host method is replaced by the entropy of a subjective-logic opinion that keeps an explicit
uncertainty mass (:class:`~tta.parts.objectives.COMEEntropy`), in its loss, its reliability filter and
its sample weights alike; the redundancy filter still compares softmax probabilities (as the official
EATA+COME). Hosts: ``tent`` (default), ``eta``, ``eata`` (needs ``fisher_data``), ``sar``.

The CIFAR-10-C defaults are our choice (no official CIFAR setting exists): the host's reference CIFAR
values with the objective swapped. The official ImageNet setting (TENT host, SGD lr 2.5e-4 momentum 0.9
without Nesterov, batch 64) is configs/imagenetc/come.yaml.
"""
from typing import Optional

import torch

from ..errors import ConfigError
from ..parts.objectives import COMEEntropy
from . import Cost, get, method_options, register

HOSTS = ("tent", "eta", "eata", "sar")


@register("come", summary="the host's entropy replaced by COME's conservative (uncertainty-aware) entropy",
          adapts="as the host (norm affine)", cost=Cost(grad=1, backward=1, nograd=0),
          source_data="only with host eata: clean images for the Fisher estimate (fisher_data)")
def come(model, *, host: str = "tent", k: Optional[float] = None, margin_frac: Optional[float] = None,
         d_margin: Optional[float] = None, fisher_data: Optional[torch.Tensor] = None,
         fisher_alpha: Optional[float] = None, fisher_n: Optional[int] = None,
         fisher_batch_size: Optional[int] = None, rho: Optional[float] = None, reset_below: Optional[float] = None,
         skip_top: Optional[bool] = None):
    """``k``: K of the opinion (None: the number of classes). The other options are the host's (None:
    the host's default); one the host does not take is an error."""
    if host not in HOSTS:
        raise ConfigError(f"come host must be one of {', '.join(HOSTS)}, got {host!r}")
    given = {k_: v for k_, v in dict(margin_frac=margin_frac, d_margin=d_margin, fisher_data=fisher_data,
                                      fisher_alpha=fisher_alpha, fisher_n=fisher_n, fisher_batch_size=fisher_batch_size,
                                      rho=rho, reset_below=reset_below, skip_top=skip_top).items() if v is not None}
    wrong = sorted(set(given) - set(method_options(host)))
    if wrong:
        raise ConfigError(f"come with host {host!r} does not take {wrong}; {host} takes: "
                          f"{', '.join(method_options(host)) or 'no options of its own'}")
    return get(host)(model, **given).but(entropy=COMEEntropy(k))
