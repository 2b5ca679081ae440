"""Per-group optimizer specs: one optimizer + LR schedule per parameter group.

Every parameter group of a method (``student``, ``lrm``, ``disc``, ``fake_score``, ...) gets its own
optimizer built from an :class:`OptimizerSpec`. A spec field left ``None`` falls back, in order, to
the method's default for that group (:meth:`~fastgen.trainers.method.Method.optimizer_specs`, e.g. a
GAN discriminator's betas) and then to the ``train:`` section's global value (``learning_rate``,
``adam_beta1`` ...). In a recipe::

    train:
      learning_rate: 1.0e-4          # every group unless its spec says otherwise
      optimizers:
        disc: {optimizer: adam, learning_rate: 2.0e-4, betas: [0.0, 0.99], max_grad_norm: null}

The LR schedule of a group counts **that group's own updates**: a group that steps every third
iteration (``Method.optimizers_to_step``) warms up over its first ``warmup_steps`` updates, and a
cosine/linear schedule decays over the updates it will make in ``train.max_steps`` iterations.

``prodigy`` is Prodigy (Mishchenko & Defazio, the ``prodigyopt`` package, an optional dependency:
``pip install prodigyopt`` or ``pip install fastgen[prodigy]``): an Adam variant that estimates its own
step size ``d``; ``learning_rate`` is a multiplier on that estimate (1.0 as recommended), and the LR
schedule scales it as usual. Its own knobs go in ``options`` (``d_coef``, ``use_bias_correction``,
``safeguard_warmup``, ``growth_rate``, ``beta3``, ``decouple``). ``d`` and the running sums live in the
optimizer's state dict, so checkpoints resume it exactly::

    train:
      optimizer: prodigy             # every group's default (the train: value used when no spec names one)
      learning_rate: 1.0
      optimizers:
        student: {options: {use_bias_correction: true, safeguard_warmup: true}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from fastgen.errors import ConfigError

__all__ = [
    "OPTIMIZERS", "OptimizerSpec", "ResolvedSpec", "build_optimizer", "check_optimizers_available", "lr_lambda",
    "optimizer_class", "resolve_spec",
]

#: optimizer names a spec may use
OPTIMIZERS = ("adamw", "adam", "sgd", "prodigy", "adamw8bit")
_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


@dataclass
class OptimizerSpec:
    """One parameter group's optimizer; ``None`` fields inherit (method default, then ``train:``).

    Attributes:
        optimizer: ``adamw``, ``adam``, ``sgd``, ``prodigy`` (needs the ``prodigyopt`` package) or
            ``adamw8bit`` (bitsandbytes' AdamW with 8-bit moments: a quarter of AdamW's state memory;
            CUDA, needs the ``bitsandbytes`` package).
        learning_rate: base learning rate (Prodigy: its ``lr`` multiplier, usually 1.0).
        betas: Adam(W)/Prodigy ``(beta1, beta2)``.
        eps: Adam(W)/Prodigy epsilon.
        weight_decay: decoupled (AdamW, Prodigy) or L2 (Adam, SGD) weight decay.
        momentum: SGD momentum.
        max_grad_norm: clip this group's gradient norm; ``null`` in the resolved spec = no clipping
            (set ``clip: false`` to turn clipping off for one group when ``train.max_grad_norm`` is set).
        clip: ``false`` turns clipping off for this group whatever ``max_grad_norm`` says.
        lr_scheduler: ``constant``, ``constant_with_warmup``, ``cosine`` or ``linear``.
        warmup_steps: warm-up length in this group's own updates.
        foreach: use the multi-tensor (foreach) optimizer implementation where torch has one.
        fused: use torch's fused (single-kernel) Adam/AdamW/SGD step (CPU and CUDA); ``null`` = torch's default.
        options: further keyword arguments of the optimizer class, e.g. Prodigy's
            ``{d_coef: 1.0, use_bias_correction: true, safeguard_warmup: true}`` or AdamW's
            ``{amsgrad: true}``; a key the class does not take is a ConfigError.
    """

    optimizer: Literal["adamw", "adam", "sgd", "prodigy", "adamw8bit"] | None = None
    learning_rate: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    max_grad_norm: float | None = None
    clip: bool | None = None
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] | None = None
    warmup_steps: int | None = None
    foreach: bool | None = None
    fused: bool | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ResolvedSpec:
    """An :class:`OptimizerSpec` with every field decided (what :func:`build_optimizer` uses)."""

    optimizer: str
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    momentum: float
    max_grad_norm: float | None
    lr_scheduler: str
    warmup_steps: int
    foreach: bool | None = None
    fused: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["options"] = dict(self.extra)
        return out


def _merge(*specs: OptimizerSpec | None) -> OptimizerSpec:
    """Field-wise first non-None over ``specs`` (earlier wins)."""
    out = OptimizerSpec()
    for f in fields(OptimizerSpec):
        for spec in specs:
            if spec is not None and getattr(spec, f.name) is not None:
                out = replace(out, **{f.name: getattr(spec, f.name)})
                break
    return out


def resolve_spec(group: str, recipe: OptimizerSpec | None, method_default: OptimizerSpec | None, train: Any) -> ResolvedSpec:
    """The spec of ``group``: recipe (``train.optimizers.<group>``), then the method's default, then
    the ``train:`` globals (``learning_rate`` / ``learning_rates.<group>``, ``adam_beta1/2``,
    ``adam_epsilon``, ``weight_decay``, ``max_grad_norm``, ``lr_scheduler``, ``warmup_steps``)."""
    legacy_lr = getattr(train, "learning_rates", {}).get(group)
    legacy = OptimizerSpec(learning_rate=legacy_lr) if legacy_lr is not None else None
    merged = _merge(recipe, legacy, method_default)
    name = merged.optimizer or getattr(train, "optimizer", None) or "adamw"
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizers.{group}.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    lr = merged.learning_rate if merged.learning_rate is not None else train.learning_rate
    betas = tuple(merged.betas) if merged.betas is not None else (train.adam_beta1, train.adam_beta2)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"train.optimizers.{group}.betas must be two numbers in [0, 1), got {list(betas)}")
    clip_norm = merged.max_grad_norm if merged.max_grad_norm is not None else train.max_grad_norm
    if merged.clip is False:
        clip_norm = None
    sched = merged.lr_scheduler or train.lr_scheduler
    if sched not in _SCHEDULES:
        raise ConfigError(f"train.optimizers.{group}.lr_scheduler must be one of {', '.join(_SCHEDULES)}, got {sched!r}")
    spec = ResolvedSpec(
        optimizer=name,
        learning_rate=float(lr),
        betas=(float(betas[0]), float(betas[1])),
        eps=float(merged.eps if merged.eps is not None else train.adam_epsilon),
        weight_decay=float(merged.weight_decay if merged.weight_decay is not None else train.weight_decay),
        momentum=float(merged.momentum if merged.momentum is not None else 0.0),
        max_grad_norm=None if clip_norm is None else float(clip_norm),
        lr_scheduler=sched,
        warmup_steps=int(merged.warmup_steps if merged.warmup_steps is not None else train.warmup_steps),
        foreach=merged.foreach,
        fused=merged.fused,
        extra=dict(merged.options or {}),
    )
    reserved = sorted(set(spec.extra) & set(_SPEC_KEYWORDS))
    if reserved:
        raise ConfigError(
            f"train.optimizers.{group}.options sets {reserved[0]!r}, which the spec itself sets; use "
            f"train.optimizers.{group}.{_SPEC_KEYWORDS[reserved[0]]} instead"
        )
    if not (spec.learning_rate > 0 and math.isfinite(spec.learning_rate)):
        raise ConfigError(f"the learning rate of optimizer '{group}' must be a positive finite number, got {spec.learning_rate}")
    if spec.max_grad_norm is not None and not spec.max_grad_norm > 0:
        raise ConfigError(f"train.optimizers.{group}.max_grad_norm must be > 0 or null, got {spec.max_grad_norm}")
    if spec.warmup_steps < 0:
        raise ConfigError(f"train.optimizers.{group}.warmup_steps must be >= 0, got {spec.warmup_steps}")
    return spec


#: optimizer keyword -> the spec field that sets it (``options`` may not set these)
_SPEC_KEYWORDS = {"lr": "learning_rate", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
                  "momentum": "momentum", "foreach": "foreach", "fused": "fused", "params": "(the method's parameter group)"}
_PRODIGY_HINT = "`pip install prodigyopt` (or `pip install fastgen[prodigy]`)"
_BNB_HINT = "`pip install bitsandbytes` (CUDA)"


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of ``name`` (one of :data:`OPTIMIZERS`).

    Raises:
        ConfigError: ``prodigy`` without the ``prodigyopt`` package (naming ``pip install prodigyopt``).
    """
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adam":
        return torch.optim.Adam
    if name == "sgd":
        return torch.optim.SGD
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise ConfigError(
                f"optimizer 'prodigy' needs the prodigyopt package, which is not installed: {_PRODIGY_HINT}; "
                "or choose adamw/adam/sgd (train.optimizer / train.optimizers.<group>.optimizer)"
            ) from exc
        return Prodigy
    if name == "adamw8bit":
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as exc:
            raise ConfigError(
                f"optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed: {_BNB_HINT}; "
                "or choose adamw (train.optimizer / train.optimizers.<group>.optimizer)"
            ) from exc
        return AdamW8bit
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def check_optimizers_available(train: Any) -> None:
    """Fail fast (before a teacher is loaded) when the ``train:`` section names an optimizer whose package
    is missing: ``train.optimizer`` and every ``train.optimizers.<group>.optimizer``."""
    names = {getattr(train, "optimizer", None)}
    names.update(getattr(spec, "optimizer", None) for spec in (getattr(train, "optimizers", None) or {}).values())
    for name in sorted(n for n in names if n):
        if name in OPTIMIZERS:
            optimizer_class(name)


def build_optimizer(params: list[torch.nn.Parameter], spec: ResolvedSpec, group: str = "") -> torch.optim.Optimizer:
    """The torch optimizer of ``spec`` over ``params`` (``group`` names it in errors)."""
    cls = optimizer_class(spec.optimizer)
    kwargs: dict[str, Any] = {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}
    if spec.optimizer == "sgd":
        kwargs["momentum"] = spec.momentum
    else:
        kwargs.update(betas=spec.betas, eps=spec.eps)
    if spec.foreach is not None and spec.optimizer not in ("prodigy", "adamw8bit"):  # no foreach switch there
        kwargs["foreach"] = spec.foreach
    if spec.fused is not None and spec.optimizer in ("adamw", "adam", "sgd"):
        kwargs["fused"] = spec.fused
    elif spec.fused:
        raise ConfigError(f"optimizer '{group or spec.optimizer}' ({spec.optimizer}) has no fused implementation; "
                          "set fused only for adamw, adam or sgd")
    kwargs.update(spec.extra)
    try:
        return cls(params, **kwargs)
    except TypeError as exc:
        where = f"train.optimizers.{group or '<group>'}.options"
        raise ConfigError(
            f"{where} has an option {cls.__name__} does not take ({exc}); its keyword arguments are listed in "
            f"the {cls.__module__}.{cls.__name__} documentation"
        ) from exc
    except ValueError as exc:  # torch's and Prodigy's own range checks (e.g. "Invalid beta parameter")
        raise ConfigError(f"optimizer '{group or spec.optimizer}' ({cls.__name__}): {exc}") from exc


def lr_lambda(kind: str, warmup_steps: int, total_updates: int):
    """The LR multiplier as a function of the number of completed updates of the group."""

    def fn(s: int) -> float:
        if kind == "constant":
            return 1.0
        if s < warmup_steps:
            return min(1.0, (s + 1) / warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_updates - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)  # linear

    return fn
