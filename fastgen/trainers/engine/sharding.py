"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the one trainer, through ``accelerate launch``.

A fastgen method is not one module with one ``forward``: it owns several networks (a trained student,
an EMA target, a frozen teacher with its VAE and text encoders, a discriminator) and runs arbitrary
``train_step`` code over them. So accelerate's ``prepare(model)`` cannot wrap it; this module applies
``fully_shard`` itself, network by network, and gives the trainer what changes when parameters are
sharded :class:`~torch.distributed.tensor.DTensor` s:

* **which modules are sharded** (:func:`plan_sharding`, pure, testable in one process): the method's
  *networks* are found by walking its module tree: a diffusers ``ModelMixin`` / transformers
  ``PreTrainedModel`` is a network; so is any other module with its own ``forward`` and no such model
  inside (e.g. a small MLP head). Inside each network, every block of :data:`DEFAULT_BLOCK_CLASSES`
  (or the classes named by the plugin's ``transformer_cls_names_to_wrap``; or modules over
  ``min_num_params`` for a size-based policy) becomes its own FSDP unit, innermost first, then the
  network's root takes the rest. Trained networks are always sharded; frozen ones too
  (``train.fsdp_frozen: shard``) or kept whole in their dtype on every rank (``keep``), except a frozen
  network shaped exactly like a trained one (an EMA / consistency *target* that ``ema_update_`` lerps
  towards the student): it is sharded like the student so that the shards line up.
* **identical weights first**: each unit's tensors are moved to the device and broadcast from rank 0
  just before it is sharded (one block in full on the device at a time, not the whole network).
* :class:`~fastgen.trainers.engine.ema.EMA` shadows of sharded parameters become DTensors with the
  same placements (:meth:`EMA.shard_like_module`).
* **gradients**: FSDP reduce-scatters (averages) them in backward; the trainer's own all-reduce is
  skipped. ``torch.autograd.backward(loss, inputs=[sharded params])`` does *not* work under FSDP2 (the
  graph runs through all-gathered unsharded parameters, so the sharded ones get no gradient; checked
  in tests/test_fsdp.py), so :func:`backward_per_group` runs one plain ``backward`` per distinct loss
  and keeps, of each pass, only the gradients of the groups that loss steps (the others' are set
  aside and restored): the same gradients as the unsharded ``inputs=`` scheme, tested against it.
  With gradient accumulation every micro-batch's backward reduce-scatters (no ``no_sync`` analogue).
* **checkpoints** keep the unsharded format: :func:`full_state_dict` / :func:`full_optimizer_state`
  gather every DTensor (all ranks take part, rank 0 keeps CPU copies) so rank 0 writes the same
  ``model.safetensors`` / ``optimizers.pt`` as an unsharded run; :func:`shard_like` /
  :func:`shard_optimizer_state` cut a loaded full state back into this rank's shards. A run resumes
  sharded or unsharded from either kind of checkpoint, and ``fastgen export`` reads it as ever.

Refused, with the reason: FSDP1 (``fsdp_version: 1`` wraps a root module into flat parameters that
per-group optimizers cannot address), fp16 (the grad scaler is not set up for sharded gradients; use
bf16), parameters that sit directly on a module that also holds networks (they would belong to no
unit whose ``forward`` runs), parameter groups that still list unsharded parameters after sharding
(a method that caches its parameter lists), and the two shipped configurations found not to work
(:func:`unsupported_reason`: DisBack with path nodes, SCott with its discriminator). A method must
reach a sharded network's weights through its ``forward`` (or ``encode`` / ``decode`` /
``get_text_features`` / ``get_image_features``, registered as forward methods); touching ``net.weight``
directly raises torch's "mixed torch.Tensor and DTensor" error. Accelerate's plugin settings used: ``fsdp_version``, ``reshard_after_forward``,
``cpu_offload`` (CUDA only), ``mixed_precision_policy`` / ``train.mixed_precision`` (parameters cast for
compute; gradients reduced in fp32), ``auto_wrap_policy`` + ``transformer_cls_names_to_wrap`` /
``min_num_params``. Not used: ``state_dict_type`` (checkpoints are always full), activation
checkpointing (use the method's ``gradient_checkpointing``), ``cpu_ram_efficient_loading``.

On CPU, accelerate reports ``MULTI_CPU`` even under ``accelerate launch --use_fsdp`` (it sets
``DistributedType.FSDP`` for GPU launches only); :func:`fsdp_requested` reads the launcher's
``ACCELERATE_USE_FSDP`` for that case, so the 2-process gloo tests run the same code path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from fastgen.errors import ConfigError, FastgenError

__all__ = [
    "DEFAULT_BLOCK_CLASSES",
    "FORWARD_METHODS",
    "FSDPSettings",
    "NetworkPlan",
    "Sharding",
    "backward_per_group",
    "find_networks",
    "fsdp_requested",
    "full_optimizer_state",
    "full_state_dict",
    "is_sharded",
    "plain",
    "plan_sharding",
    "settings_from_accelerator",
    "shard_like",
    "shard_optimizer_state",
    "trainable_parameters",
    "unsupported_reason",
]

#: Block classes that become FSDP units by default (matched by class name inside each network):
#: SD-family UNets and VAEs (ResNet and transformer blocks, then the down/mid/up stages around them),
#: DiTs (FLUX double/single-stream, SD3 joint blocks, PixArt's BasicTransformerBlock) and text encoders
#: (CLIP, T5). A network's own ``_no_split_modules`` are added.
DEFAULT_BLOCK_CLASSES: tuple[str, ...] = (
    "ResnetBlock2D", "BasicTransformerBlock", "Transformer2DModel",
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "CrossAttnUpBlock2D", "UpBlock2D",
    "DownEncoderBlock2D", "UpDecoderBlock2D",
    "FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock", "SD3SingleTransformerBlock",
    "CLIPEncoderLayer", "T5Block",
)

#: Methods besides ``forward`` through which the trainer's methods run a network (VAE encode/decode,
#: CLIP features): registered with ``register_fsdp_forward_method`` so they all-gather like ``forward``.
FORWARD_METHODS: tuple[str, ...] = ("encode", "decode", "get_text_features", "get_image_features")

_MODEL_BASES = ("ModelMixin", "PreTrainedModel")


# --------------------------------------------------------------------------- settings


@dataclass
class FSDPSettings:
    """How the networks are sharded (from accelerate's FSDP plugin and ``train.fsdp_frozen``)."""

    #: free the gathered parameters of a unit after its forward (re-gathered in backward)
    reshard_after_forward: bool = True
    #: keep sharded parameters, gradients and optimizer states in CPU memory (CUDA runs only)
    offload: bool = False
    #: dtype trained networks are cast to for compute (None: as stored); gradients reduce in fp32
    param_dtype: torch.dtype | None = None
    #: "blocks": units by class name; "size": modules with >= min_num_params; "none": one unit per network
    wrap: Literal["blocks", "size", "none"] = "blocks"
    #: class names of the units (wrap="blocks"); the defaults plus each network's ``_no_split_modules``
    block_classes: tuple[str, ...] = DEFAULT_BLOCK_CLASSES
    #: block_classes were named by the user (an unknown name is an error), not the defaults
    explicit_blocks: bool = False
    min_num_params: int = 0
    #: frozen networks: "shard" them too, or "keep" them whole (in their dtype) on every rank
    frozen: Literal["shard", "keep"] = "shard"
    #: plugin settings read but not applied (reported once)
    ignored: tuple[str, ...] = field(default_factory=tuple)


def fsdp_requested(accelerator: Any) -> bool:
    """True when the run was launched for FSDP: accelerate's distributed type is FSDP, or (CPU launches,
    where accelerate keeps MULTI_CPU) ``accelerate launch --use_fsdp`` / a config with
    ``distributed_type: FSDP`` set ``ACCELERATE_USE_FSDP``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _plugin(accelerator: Any) -> Any:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:  # CPU launch: accelerate dropped it; read the same FSDP_* environment
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    return plugin


def settings_from_accelerator(accelerator: Any, mixed_precision: str = "no", frozen: str = "shard") -> FSDPSettings:
    """:class:`FSDPSettings` from the accelerator's FSDP plugin (or the ``FSDP_*`` environment).

    Raises:
        ConfigError: FSDP1, or fp16 mixed precision.
    """
    plugin = _plugin(accelerator)
    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    if version != 2:
        raise ConfigError(
            f"FSDP version {version} is not supported by the fastgen trainer: FSDP1 flattens a root module's parameters "
            "into one FlatParameter, which per-group optimizers and their clipping cannot address; launch with FSDP2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2 ...`, or `fsdp_version: 2` in the accelerate config, "
            "e.g. configs/accelerate/8gpu-fsdp.yaml)"
        )
    if mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported with FSDP: the fp16 grad scaler is not set up for sharded "
            "gradients here; use train.mixed_precision=bf16 (or no)"
        )
    settings = FSDPSettings(frozen=frozen)  # type: ignore[arg-type]
    settings.reshard_after_forward = bool(getattr(plugin, "reshard_after_forward", True))
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy

        settings.offload = isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)
    except ImportError:  # pragma: no cover - torch without FSDP2
        settings.offload = False
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is not None and getattr(policy, "param_dtype", None) is not None:
        settings.param_dtype = policy.param_dtype
    elif mixed_precision == "bf16":
        settings.param_dtype = torch.bfloat16
    wrap = getattr(plugin, "auto_wrap_policy", None)
    wrap_name = getattr(getattr(wrap, "func", wrap), "__name__", "")
    env_wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper()
    if "size_based" in wrap_name:
        settings.wrap = "size"
        settings.min_num_params = int(getattr(plugin, "min_num_params", 0) or 0)
    elif wrap is None and env_wrap == "NO_WRAP":
        settings.wrap = "none"
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if names:
        settings.block_classes = tuple(str(n).strip() for n in names if str(n).strip())
        settings.explicit_blocks = True
    ignored = []
    if getattr(plugin, "activation_checkpointing", False):
        ignored.append("activation_checkpointing (use the method's gradient_checkpointing option)")
    settings.ignored = tuple(ignored)
    return settings


# --------------------------------------------------------------------------- planning (pure)


def _is_model_class(module: torch.nn.Module) -> bool:
    return any(c.__name__ in _MODEL_BASES for c in type(module).__mro__)


def _has_own_forward(module: torch.nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    return fwd is not None and fwd is not torch.nn.Module.forward


def _has_params(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_networks(method: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The method's networks ``(dotted name, module)``: every diffusers/transformers model, and every other
    module with its own ``forward`` and no such model inside; containers in between are walked through.

    Raises:
        FastgenError: parameters sit directly on the method or on a container that also holds networks.
    """
    found: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()
    models = {id(m) for m in method.modules() if _is_model_class(m)}

    def has_model_inside(module: torch.nn.Module) -> bool:
        return any(id(m) in models for m in module.modules())

    def visit(name: str, module: torch.nn.Module) -> None:
        if id(module) in seen or not _has_params(module):
            return
        seen.add(id(module))
        if _is_model_class(module) or (_has_own_forward(module) and not has_model_inside(module)):
            found.append((name, module))
            return
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            raise FastgenError(
                f"FSDP: module '{name}' ({type(module).__name__}) holds parameters of its own ({', '.join(own[:3])}) beside "
                "networks; they would belong to no FSDP unit whose forward runs. Move them into a small nn.Module "
                "that the method calls, or train without FSDP"
            )
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    own = [n for n, _ in method.named_parameters(recurse=False)]
    if own:
        raise FastgenError(
            f"FSDP: method '{getattr(method, 'name', type(method).__name__)}' holds parameters directly ({', '.join(own[:3])}); "
            "under FSDP every parameter must live in a network module the method calls"
        )
    for child_name, child in method.named_children():
        visit(child_name, child)
    return found


def _signature(module: torch.nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


@dataclass
class NetworkPlan:
    """What happens to one network of the method."""

    name: str
    module: torch.nn.Module
    #: holds parameters of a parameter group
    trained: bool
    #: sharded (else kept whole on every rank)
    shard: bool
    #: for a frozen copy shaped like a trained network (an EMA target): that network's name
    twin_of: str | None = None
    #: dotted names (inside the network) of the modules that become their own FSDP units, innermost first
    units: list[str] = field(default_factory=list)
    #: compute dtype (FSDP mixed precision) of the network's parameters, None: as stored
    param_dtype: torch.dtype | None = None
    #: the network's class before sharding (fully_shard renames it FSDP<class>)
    class_name: str = ""

    def __post_init__(self) -> None:
        self.class_name = self.class_name or type(self.module).__name__

    def describe(self) -> str:
        what = "trained" if self.trained else (f"frozen, shaped like {self.twin_of}" if self.twin_of else "frozen")
        n = len(self.units) + 1
        how = f"sharded in {n} FSDP unit{'s' if n > 1 else ''}" if self.shard else "kept whole on every rank"
        return f"{self.name} ({self.class_name}, {what}): {how}"


def _units(net: torch.nn.Module, settings: FSDPSettings) -> list[str]:
    if settings.wrap == "none":
        return []
    out: list[str] = []
    if settings.wrap == "size":
        if settings.min_num_params <= 0:
            return []
        # post-order: a module is a unit when its parameters not already in a unit reach the threshold
        claimed: set[int] = set()

        def walk(name: str, module: torch.nn.Module) -> None:
            for child_name, child in module.named_children():
                walk(f"{name}.{child_name}" if name else child_name, child)
            if not name:
                return
            free = [p for p in module.parameters() if id(p) not in claimed]
            if sum(p.numel() for p in free) >= settings.min_num_params:
                out.append(name)
                claimed.update(id(p) for p in free)

        walk("", net)
        return out
    classes = set(settings.block_classes)
    if not settings.explicit_blocks:
        classes |= set(getattr(net, "_no_split_modules", None) or ())
    names = [(n, m) for n, m in net.named_modules() if n and type(m).__name__ in classes and _has_params(m)]
    # innermost first: a block nested in another block is sharded before it
    names.sort(key=lambda nm: -nm[0].count("."))
    return [n for n, _ in names]


def unsupported_reason(method: torch.nn.Module) -> str | None:
    """Why ``method`` as configured cannot train sharded, or None. Two shipped cases, both found by running
    every digits recipe under 2-process FSDP on CPU:

    * DisBack with path nodes (``disback.path_nodes > 0``): rank 0 alone writes each node from the fake score's
      whole weights (``DisBack.write_node``) and nodes load whole into the real-score slot;
    * a network whose forward is cut short by an exception (the SCott discriminator's ``FeatureTap`` stops the
      backbone after its last tapped block): FSDP's post-forward hooks never run for it, and backward then
      meets parameter storage FSDP has freed.
    """
    if getattr(method, "name", "") == "disback" and int(getattr(getattr(method, "config", None), "path_nodes", 0) or 0) > 0:
        return ("DisBack with path nodes (disback.path_nodes > 0) writes each node from the whole weights of the fake score "
                "on rank 0 alone and loads nodes whole into its real-score slot; train it with DDP "
                "(configs/accelerate/8gpu-ddp.yaml), or with disback.path_nodes=0 (DMD) under FSDP")
    import sys

    disc = sys.modules.get("fastgen.models.discriminator")
    tap = getattr(disc, "FeatureTap", None)
    if tap is not None:
        for name, module in method.named_modules():
            if any(isinstance(v, tap) for v in vars(module).values()):
                return (f"'{name}' ({type(module).__name__}) stops its backbone's forward early with an exception "
                        "(FeatureTap), which leaves FSDP's hooks of that network unfinished (backward would read freed "
                        "parameters); train it with DDP (configs/accelerate/8gpu-ddp.yaml), or without the "
                        "discriminator (scott.adv_weight=0)")
    return None


def plan_sharding(method: torch.nn.Module, groups: Mapping[str, Sequence[torch.nn.Parameter]], settings: FSDPSettings) -> list[NetworkPlan]:
    """Which networks of ``method`` are sharded and into which units (no process group needed).

    ``groups``: the method's parameter groups (before sharding).

    Raises:
        FastgenError: a method FSDP cannot run (:func:`unsupported_reason`), a trained parameter outside every
            network, parameters on a container.
        ConfigError: block class names (``transformer_cls_names_to_wrap``) that match no module.
    """
    reason = unsupported_reason(method)
    if reason:
        raise FastgenError(f"FSDP cannot train method '{getattr(method, 'name', type(method).__name__)}' as configured: {reason}")
    networks = find_networks(method)
    trained_ids = {id(p) for params in groups.values() for p in params}
    owner: dict[int, str] = {}
    for name, net in networks:
        for p in net.parameters():
            owner.setdefault(id(p), name)
    stray = [n for n, p in method.named_parameters() if id(p) in trained_ids and id(p) not in owner]
    if stray:
        raise FastgenError(f"FSDP: trained parameters {stray[:3]} are in no network module of the method; they cannot be sharded")
    plans: list[NetworkPlan] = []
    trained_sigs: dict[tuple, str] = {}
    for name, net in networks:
        if any(id(p) in trained_ids for p in net.parameters()):
            trained_sigs.setdefault(_signature(net), name)
    for name, net in networks:
        trained = any(id(p) in trained_ids for p in net.parameters())
        twin = None if trained else trained_sigs.get(_signature(net))
        shard = trained or twin is not None or settings.frozen == "shard"
        plans.append(NetworkPlan(
            name=name, module=net, trained=trained, shard=shard, twin_of=twin,
            units=_units(net, settings) if shard else [],
            param_dtype=settings.param_dtype if (trained or twin is not None) else None,
        ))
    if settings.wrap == "blocks" and settings.explicit_blocks:
        present = {type(m).__name__ for p in plans if p.shard for m in p.module.modules()}
        unknown = [c for c in settings.block_classes if c not in present]
        if unknown:
            raise ConfigError(
                f"FSDP transformer_cls_names_to_wrap names {unknown}, which no sharded network of the method contains; "
                f"block classes present include: {', '.join(sorted(present & set(DEFAULT_BLOCK_CLASSES)) or 'none of the defaults')}"
            )
    return plans


# --------------------------------------------------------------------------- DTensor helpers


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a sharded parameter, gradient, optimizer state or EMA shadow)."""
    try:
        return isinstance(t, _dtensor_cls())
    except ImportError:  # pragma: no cover
        return False


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it), other tensors as they are."""
    return t.full_tensor() if is_sharded(t) else t


def _distribute_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the full tensor, identical on every rank) cut like the DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def full_state_dict(state: Mapping[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Gather every DTensor of ``state`` into a full CPU tensor. All ranks must call it with the same keys;
    ``keep=False`` (ranks other than the writer) returns ``{}`` after taking part."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):  # the same collective order on every rank
        v = state[key]
        if is_sharded(v):
            v = v.full_tensor()
        if keep:
            out[key] = v.detach().to("cpu")
    return {k: out[k] for k in state} if keep else {}


@torch.no_grad()
def full_optimizer_state(state: Mapping[str, Any], keep: bool = True) -> dict[str, Any]:
    """An optimizer ``state_dict()`` with every DTensor gathered (the unsharded format); see :func:`full_state_dict`."""
    per_param = state.get("state", {})
    gathered: dict[Any, dict[str, Any]] = {}
    for pid in sorted(per_param, key=lambda x: int(x)):
        entry = per_param[pid]
        row: dict[str, Any] = {}
        for key in sorted(entry):
            v = entry[key]
            if is_sharded(v):
                v = v.full_tensor()
            row[key] = v.detach().to("cpu") if isinstance(v, torch.Tensor) else v
        gathered[pid] = {k: row[k] for k in entry}
    if not keep:
        return {}
    return {**{k: v for k, v in state.items() if k != "state"}, "state": {pid: gathered[pid] for pid in per_param}}


def shard_like(loaded: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state (every rank loaded the same file) with each entry that is a DTensor in ``current``
    (e.g. ``method.checkpoint_state_dict()``) cut into this rank's shard; shape mismatches are left for the
    method's own load to report."""
    out = dict(loaded)
    for key, cur in current.items():
        v = out.get(key)
        if is_sharded(cur) and isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(cur.shape):
            out[key] = _distribute_like(v, cur)
    return out


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state (the unsharded format) with each parameter-shaped tensor cut like its
    (sharded) parameter, ready for ``optimizer.load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    new_state: dict[Any, dict[str, Any]] = {}
    for pid, entry in state.get("state", {}).items():
        i = int(pid)
        p = params[i] if 0 <= i < len(params) else None
        row = dict(entry)
        if p is not None and is_sharded(p):
            for key, v in entry.items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                    row[key] = _distribute_like(v, p)
        new_state[pid] = row
    return {**{k: v for k, v in state.items() if k != "state"}, "state": new_state}


def backward_per_group(
    items: Sequence[tuple[torch.Tensor, Sequence[str]]],
    groups: Mapping[str, Sequence[torch.nn.Parameter]],
    trainable: Sequence[torch.nn.Parameter],
    scale: float = 1.0,
) -> None:
    """Backward of each ``(loss, group names)`` into only those groups' parameters, without ``inputs=``.

    One plain ``backward`` per loss (FSDP's hooks reduce-scatter what it produced); before each pass every
    trainable parameter's gradient is set aside, after it the new gradients of the loss's groups are added
    to what those groups had and everything else is put back. Equal to
    ``torch.autograd.backward(loss, inputs=group_params)`` per loss (which leaves sharded parameters
    without gradients under FSDP2), at the price of a backward that also computes (and drops) gradients
    of other groups the loss reaches.
    """
    trainable = list(trainable)
    result: dict[int, torch.Tensor | None] = {id(p): p.grad for p in trainable}
    for p in trainable:
        p.grad = None
    try:
        for i, (loss, names) in enumerate(items):
            (loss.reshape(()) * scale).backward(retain_graph=i < len(items) - 1)
            for name in names:
                for p in groups[name]:
                    g = p.grad
                    if g is not None:
                        prev = result.get(id(p))
                        result[id(p)] = g if prev is None else prev + g
            for p in trainable:
                p.grad = None
    finally:
        for p in trainable:
            p.grad = result.get(id(p))


# --------------------------------------------------------------------------- applying


class Sharding:
    """FSDP2 applied to one method: built by :meth:`from_accelerator`, then :meth:`apply` once."""

    def __init__(self, settings: FSDPSettings, world_size: int, rank: int):
        self.settings = settings
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.plans: list[NetworkPlan] = []
        self.mesh = None

    @classmethod
    def from_accelerator(cls, accelerator: Any, mixed_precision: str = "no", frozen: str = "shard") -> "Sharding | None":
        """A :class:`Sharding` when the run was launched for FSDP with more than one process, else None."""
        if not fsdp_requested(accelerator):
            return None
        if accelerator.num_processes < 2:
            warnings.warn("FSDP was requested for a single process; training unsharded")
            return None
        settings = settings_from_accelerator(accelerator, mixed_precision, frozen)
        return cls(settings, accelerator.num_processes, accelerator.process_index)

    # ---- setup ------------------------------------------------------------------------------------
    def apply(self, method: torch.nn.Module, groups: Mapping[str, Sequence[torch.nn.Parameter]], device: torch.device) -> list[NetworkPlan]:
        """Shard the method's networks (every rank, same order), broadcast everything else from rank 0, move
        the rest of the method to ``device`` and re-shard EMA shadows. Returns the plans."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        settings = self.settings
        if settings.offload and device.type == "cpu":
            settings = self.settings = replace(settings, offload=False)  # nothing to offload to
        for note in settings.ignored:
            warnings.warn(f"FSDP plugin setting not applied by the fastgen trainer: {note}")
        self.plans = plan_sharding(method, groups, settings)
        self.mesh = mesh = init_device_mesh(device.type, (self.world_size,))
        @torch.no_grad()
        def sync(module: torch.nn.Module) -> None:
            # every tensor not sharded yet (a nested unit's parameters already are; its buffers go again, they
            # are small); no id() bookkeeping: ids of the replaced parameters are reused by new tensors
            module.to(device)
            for t in [*module.parameters(), *module.buffers()]:
                if is_sharded(t) or not t.numel():
                    continue
                data = t.data if t.data.is_contiguous() else t.data.contiguous()
                dist.broadcast(data, src=0)
                if data is not t.data:
                    t.data.copy_(data)

        for plan in self.plans:
            if not plan.shard:
                continue
            kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
            if plan.param_dtype is not None:
                kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=torch.float32)
            if settings.offload:
                kwargs["offload_policy"] = CPUOffloadPolicy()
            net = plan.module
            for unit in plan.units:
                sub = net.get_submodule(unit)
                sync(sub)
                fully_shard(sub, **kwargs)
            sync(net)
            fully_shard(net, **kwargs)
            for name in FORWARD_METHODS:
                if callable(getattr(type(net), name, None)):
                    register_fsdp_forward_method(net, name)
        method.to(device)
        sync(method)  # the rest: frozen networks kept whole, buffers, small modules
        for ema in _find_emas(method):
            ema.shard_like_module()
        return self.plans

    def check_groups(self, groups: Mapping[str, Sequence[torch.nn.Parameter]], method_name: str = "") -> None:
        """After sharding, every parameter of every group must be a sharded parameter of the method."""
        for name, params in groups.items():
            bad = [i for i, p in enumerate(params) if not is_sharded(p)]
            if bad:
                raise FastgenError(
                    f"FSDP: parameter group '{name}' of method '{method_name}' still lists {len(bad)} unsharded parameter(s) "
                    "after sharding; parameter_groups() must return the networks' current parameters (FSDP replaces "
                    "them with sharded ones), not lists cached before training"
                )

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.plans)


def _find_emas(method: torch.nn.Module) -> list[Any]:
    """EMA objects held by the method or any of its modules (attributes, lists, dicts)."""
    from fastgen.trainers.engine.ema import EMA

    found: dict[int, Any] = {}

    def look(value: Any, depth: int = 0) -> None:
        if isinstance(value, EMA):
            found.setdefault(id(value), value)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for v in value:
                look(v, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for v in value.values():
                look(v, depth + 1)

    for module in method.modules():
        for value in vars(module).values():
            look(value)
    return list(found.values())


def trainable_parameters(method: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter of the method that requires grad (the ones a plain backward can reach)."""
    return [p for p in method.parameters() if p.requires_grad]

