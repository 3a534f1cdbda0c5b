"""The online loop shared by every gradient-based method.

For each incoming batch: forward -> sample filters -> per-sample objective x weights (+ batch terms
+ regularisers) -> update step (with gradient transforms) -> after-step moves in parameter space (EMA
towards the source, ...) -> reset policies. The prediction returned is the output of the first forward,
the one used for the loss (predict, then adapt; METHODS.md 1.3), through the recipe's ``output`` part
when it has one (ROID's prior correction).

A method is a :class:`Recipe` (the parts) handed to an :class:`Adapter` (the loop). Methods whose loop
differs (CoTTA's teacher, CLIPTTA's inner steps) subclass ``Adapter`` and override ``adapt``.

The fast options (``precision``, ``memory_format``, ``compile``) live in :mod:`tta.fast`; the loop only
hands each batch to ``self.fast.run`` and calls the model through ``call_model``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .errors import InputError
from .fast import FastPath
from .parts.norm import uses_batch_stats
from .parts.optim import OptimizerSpec
from .parts.params import NoParams, freeze_all_but
from .parts.postprocess import build as build_postprocess
from .parts.steps import PlainStep


@dataclass
class Recipe:
    """The parts of a method. Only ``params``, ``norm`` and ``objective`` are required for learning;
    a recipe whose ``objective`` is None never computes gradients (source, norm)."""

    norm: Callable[[nn.Module], nn.Module]
    params: Callable = field(default_factory=NoParams)
    objective: Optional[Callable] = None
    filters: Sequence[Callable] = ()
    weight: Optional[Callable] = None
    batch_terms: Sequence[Callable] = ()
    regularisers: Sequence[Callable] = ()
    step: Callable = field(default_factory=PlainStep)
    grad_transforms: Sequence[Callable] = ()
    resets: Sequence[Callable] = ()
    after_step: Sequence[Callable] = ()  # (adapter) -> None after every update: parameter-space moves
    output: Optional[Callable] = None  # (adapter, Output) -> prediction; default: the loss forward's logits
    entropy: Optional[Callable] = None  # logits -> per-sample uncertainty read by objective/filters/weights
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    adapter_cls: Optional[type] = None  # an Adapter subclass for methods with their own loop
    options: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for adapter_cls

    def but(self, **changes) -> "Recipe":
        """A copy with some parts replaced (``TENT.but(filters=[...])``)."""
        return dataclasses.replace(self, **changes)

    def parts(self) -> List[Any]:
        single = [self.objective, self.weight, self.step, self.output]
        many = [*self.filters, *self.batch_terms, *self.regularisers, *self.grad_transforms, *self.resets,
                *self.after_step]
        return [p for p in single + many if p is not None]


class Batch:
    """One forward pass as the parts see it: input, logits and derived quantities computed once."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, adapter: "Adapter", update_state: bool = True):
        self.x, self.logits, self.adapter = x, logits, adapter
        self.update_state = update_state  # False on re-evaluations (SAM's second pass)
        self.extras: Dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @cached_property
    def log_probs(self) -> torch.Tensor:
        return self.logits.log_softmax(1)

    @cached_property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(1)

    @cached_property
    def entropy(self) -> torch.Tensor:
        """Per-sample entropy, differentiable: Shannon's, or the recipe's own measure when it has one
        (COME's opinion entropy replaces it in the loss, the filters and the weights alike)."""
        fn = self.adapter.recipe.entropy if self.adapter is not None else None
        return fn(self.logits) if fn is not None else -(self.probs * self.log_probs).sum(1)


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor
    mask: torch.Tensor  # bool (B,): samples that entered the per-sample loss
    batch: Batch

    @cached_property
    def selected(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def loss_value(self) -> float:
        return float(self.loss.detach())


def check_batch(x: torch.Tensor, channels: Optional[int] = 3, tolerance: float = 1e-3) -> None:
    """One clear error for anything that is not a non-empty (N, C, H, W) float image batch in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch: expected at least one image")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point batch with values in [0, 1], got dtype {x.dtype} "
                         "(convert uint8 images with x.float() / 255)")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"expected {channels} channels in dimension 1 (N, C, H, W), got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}; channels-last input needs x.permute(0, 3, 1, 2))")
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise InputError("the batch contains NaN or Inf pixel values")
    if lo < -tolerance or hi > 1 + tolerance:
        raise InputError(f"pixel values must lie in [0, 1] (normalisation happens inside the model); "
                         f"got range [{lo:.4g}, {hi:.4g}]")


class Adapter(nn.Module):
    """Wraps a model; ``adapter(x)`` predicts on ``x`` then adapts on it; ``reset()`` restores the source.

    The model is configured in place (norm mode, ``requires_grad``; with the fast options also its memory
    format and the bf16 autocast hooks) because that is what adaptation needs; everything else about it is
    left as it was. ``reset()`` restores parameters, buffers, optimizer state and every part's state bit
    for bit from a snapshot taken once here.
    """

    fast = FastPath()  # the defaults, for adapters pickled before the fast options existed
    routes_forwards = False  # a subclass with its own ``adapt`` that calls the model only via ``call_model``

    def __init__(self, model: nn.Module, recipe: Recipe, *, optimizer: Optional[OptimizerSpec] = None,
                 steps: int = 1, episodic: bool = False, seed: int = 0, validate: bool = True,
                 channels: Optional[int] = 3, postprocess=None, precision: str = "fp32",
                 memory_format: str = "contiguous", compile="off"):
        super().__init__()
        self.fast = FastPath(precision, memory_format, compile)
        shared_loop = type(self).adapt is Adapter.adapt or self.routes_forwards
        self.model = self.fast.prepare(recipe.norm(model), type(self).__name__, shared_loop)
        self.recipe = recipe
        self.steps, self.episodic, self.seed, self.validate, self.channels = steps, episodic, seed, validate, channels
        self.postprocess = build_postprocess(postprocess)  # applied to every returned prediction (em_inf)
        named = recipe.params(self.model) if recipe.objective is not None else []
        freeze_all_but(self.model, named)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        spec = optimizer or recipe.optimizer
        self.optimizer = spec.build(self.params) if self.params else None
        self.generator = torch.Generator().manual_seed(seed)
        self.counters: Counter = Counter()
        self.last: Dict[str, Any] = {}
        self.batch_stats = uses_batch_stats(self.model)
        for part in recipe.parts():
            if hasattr(part, "bind"):
                part.bind(self)
        self.snapshot()

    def snapshot(self) -> None:
        """Take the point ``reset()`` returns to: every tensor of the model and of any other network the
        adapter holds as a submodule (teacher, projector, ...) and the optimizer state. Taken at the end of
        construction; an adapter that builds networks or warms up in its own constructor calls it again
        at the end of it (RMT's reset point is after its warm-up)."""
        self._source_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._extra_state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("model.")}
        self._source_optim = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    # ----------------------------------------------------------------------------------------- public
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            check_batch(x, self.channels)
            if x.shape[0] == 1 and self.batch_stats:
                raise InputError("a batch of 1 image under test-batch BN statistics normalises every "
                                 "feature to zero; use batch size > 1, or a single-sample stream with the "
                                 "sliding window option (stream.window), or the norm_alpha method")
        if self.episodic:
            self.reset()
        self.counters["batches"] += 1
        out = self.fast.run(self.adapt, x)  # input layout, CUDA-graph steps, compile timing (tta/fast.py)
        return out if self.postprocess is None else self.postprocess(out)

    def reset(self) -> None:
        """Back to the source model, optimizer and part states, bit for bit."""
        self.model.load_state_dict(self._source_state)
        if self._extra_state:
            self.load_state_dict(self._extra_state, strict=False)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_optim))
            self.optimizer.zero_grad(set_to_none=True)
        self.generator.manual_seed(self.seed)
        for part in self.recipe.parts():
            if hasattr(part, "reset"):
                part.reset()
        self.reset_state()

    def reset_state(self) -> None:
        """Hook for subclasses with state of their own (teachers, memories)."""

    def train(self, mode: bool = True):
        """The norm mode set at construction is kept: train()/eval() do not change how BN normalises."""
        return self

    # ------------------------------------------------------------------------------------ the loop
    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizer is None:
            with torch.inference_mode():
                return self.call_model(x)
        first = None
        for _ in range(self.steps):
            out = self.compute_loss(x)
            first = out if first is None else first
            value = self.recipe.step(self, x, out)
            for hook in self.recipe.after_step:
                hook(self)
            self.last = {"selected": out.selected, "stepped": value is not None, "loss": value,
                         "batch": x.shape[0]}
            self.counters["selected"] += out.selected
            if any(policy(self, value) for policy in self.recipe.resets):
                self.reset()
                self.counters["resets"] += 1
        return self.recipe.output(self, first) if self.recipe.output else first.logits.detach()

    def compute_loss(self, x: torch.Tensor, within: Optional[torch.Tensor] = None,
                     update_state: bool = True) -> Output:
        """Forward with gradients and the recipe's loss. ``within`` restricts the filters to a subset."""
        r = self.recipe
        logits = self.call_model(x)
        batch = Batch(x, logits, self, update_state)
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=logits.device) if within is None else within
        for f in r.filters:
            mask = f(batch, mask)
        per_sample = r.objective(batch)
        if r.weight is not None:
            per_sample = per_sample * r.weight(batch)
        if r.filters or within is not None:
            loss = per_sample[mask].sum() / mask.sum().clamp_min(1)
        else:
            loss = per_sample.mean()
        for term in r.batch_terms:
            loss = loss + term(batch)
        for reg in r.regularisers:
            loss = loss + reg(self)
        return Output(logits, loss, mask, batch)

    def call_model(self, x: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
        """``model(x)`` (default: the adapted model), compiled when the ``compile`` option says so. The
        shared loop calls the model only through here."""
        return self.fast.call(self.model if model is None else model, x)

    # ------------------------------------------------------------------- helpers for steps/parts
    def should_step(self, out: Output) -> bool:
        """No step on a batch with no selected sample; a non-finite loss is skipped and counted."""
        if out.selected == 0:
            self.counters["empty"] += 1
            return False
        if not torch.isfinite(out.loss.detach()):
            self.counters["nonfinite"] += 1
            return False
        return True

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.counters["backward"] += 1

    def optimizer_step(self) -> None:
        """Gradient transforms, then the optimizer step; gradients are cleared afterwards."""
        for transform in self.recipe.grad_transforms:
            transform(self)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["steps"] += 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def extra_repr(self) -> str:
        fast = "" if self.fast.is_default else ", " + ", ".join(f"{k}={v}" for k, v in self.fast.options().items())
        return f"params={len(self.params)} tensors, steps={self.steps}, episodic={self.episodic}{fast}"
