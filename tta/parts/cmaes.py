"""CMA-ES for forward-only adaptation (FOA, METHODS-ZOO Z.15), through the ``cma`` package (pycma).

pycma draws its samples from NumPy's *global* random state and seeds it when an optimiser is created
(Z.15 pitfall: every reset would re-seed NumPy for the whole process). :class:`CMAES` runs every pycma
call inside its own saved NumPy state and puts the caller's back afterwards, so it is deterministic for
its seed and leaves the rest of the process's randomness alone.

pycma's eigendecomposition of the covariance (2304 x 2304 for ViT-B) runs in NumPy's BLAS, which by
default starts a thread per core: on a shared machine one 576-dimensional decomposition took 7 s with
the default threads and 0.3 s with one (measured here). The calls therefore run with BLAS limited to
torch's thread count (``threadpoolctl``), the same budget the forwards use.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np

from ..errors import ConfigError
from .base import Part


class CMAES(Part):
    """``ask() -> (popsize, dim)`` candidates, ``tell(solutions, fitness)``; ``reset()`` starts afresh
    (mean 0, step size ``sigma0``, full covariance, pycma's other defaults)."""

    def __init__(self, dim: int, popsize: int = 27, sigma0: float = 1.0, seed: int = 2020):
        try:
            import cma  # noqa: F401
        except ImportError:
            raise ConfigError("CMA-ES needs the cma package: pip install cma") from None
        if dim < 1 or popsize < 2 or not sigma0 > 0:
            raise ConfigError(f"CMA-ES needs dim >= 1, popsize >= 2, sigma0 > 0; got {dim}, {popsize}, {sigma0}")
        self.dim, self.popsize, self.sigma0, self.seed = dim, popsize, sigma0, seed
        self._state: Optional[dict] = None
        self.es = None
        self.reset()

    @contextmanager
    def _numpy_rng(self):
        import torch
        from threadpoolctl import threadpool_limits
        outside = np.random.get_state()
        if self._state is not None:
            np.random.set_state(self._state)
        try:
            with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outside)

    def reset(self) -> None:
        import cma
        self._state = None
        with self._numpy_rng():
            np.random.seed(self.seed)
            self.es = cma.CMAEvolutionStrategy(np.zeros(self.dim), self.sigma0,
                                               {"popsize": self.popsize, "seed": self.seed, "maxiter": np.inf,
                                                "verbose": -9, "verb_disp": 0, "verb_log": 0})

    def ask(self) -> np.ndarray:
        with self._numpy_rng():
            return np.asarray(self.es.ask())

    def tell(self, solutions, fitness) -> None:
        with self._numpy_rng():
            self.es.tell(list(solutions), [float(f) for f in fitness])

    def __repr__(self):
        return f"CMAES(dim={self.dim}, popsize={self.popsize}, sigma0={self.sigma0}, seed={self.seed})"
