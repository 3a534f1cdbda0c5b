"""No-gradient baselines: the source model, test-batch BN statistics, and source/test moment mixing."""
from ..adapter import Recipe
from ..parts.norm import AlphaStats, BatchStats, SourceStats
from . import Cost, register


@register("source", summary="the unadapted model (eval mode, source statistics)", adapts="nothing", cost=Cost())
def source(model):
    """The unadapted model in eval mode."""
    return Recipe(norm=SourceStats())


@register("norm", summary="normalise with each test batch's BN statistics",
          adapts="BN statistics (test batch)", cost=Cost())
def norm(model):
    """BN adapt: normalise with each test batch's statistics (METHODS.md 3.1); no parameter changes."""
    return Recipe(norm=BatchStats())


@register("norm_alpha", summary="mix source and test-batch BN moments",
          adapts="BN statistics (source/test mix)", cost=Cost())
def norm_alpha(model, alpha: float = 0.1, n_prior: float = None):
    """Mix source and test-batch moments, ``mu = (1-alpha) mu_src + alpha mu_B`` (Schneider et al. 2020)."""
    return Recipe(norm=AlphaStats(alpha=alpha, n_prior=n_prior))
