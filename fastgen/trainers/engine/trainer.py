"""The one training loop shared by every distillation method.

A :class:`~fastgen.trainers.method.Method` says *what* trains (parameter groups, which of them
step at an iteration, one loss per group); the :class:`Trainer` does everything else:

* accelerate: device placement, mixed precision (``accelerator.autocast()`` and, for fp16 on a
  GPU, accelerate's grad scaler), multi-process runs started with ``accelerate launch``;
* one optimizer + LR schedule per parameter group from its spec (:mod:`.optim`: class, betas, eps,
  weight decay, clipping, a schedule counted in the group's own updates); gradient accumulation;
* gradient clipping with a NaN/Inf guard (skip the step, count, abort after N in a row);
* deterministic, resumable data order: a map-style dataset through :class:`ShardedBatchSampler`, a
  stream (:class:`~fastgen.data.streaming.StreamingDataset`, e.g. webdataset shards with
  ``data.streaming``) through its own per-rank batches, each rank's stream position saved in checkpoints;
* tqdm progress, tensorboard/wandb scalars, sample grids, a periodic evaluator given from outside
  (``evaluator(method, step)``; ``fastgen train`` passes the digits-world evaluator);
* atomic checkpoints (:mod:`fastgen.trainers.engine.checkpoint`) and exact resume.

Conventions
-----------
``step`` passed to ``train_step``/``optimizers_to_step``/``after_optimizer_step`` is the 0-based
index of the iteration being run (= the number of iterations completed before it). Checkpoints,
sample grids and metrics rows are named by the number of completed iterations
(``checkpoint-000010`` is the state after 10 iterations).

Multi-process gradient sync (the choice, and why)
-------------------------------------------------
The method is **not** wrapped in ``DistributedDataParallel``: DDP's gradient hooks are armed by
``forward()``, but methods run arbitrary ``train_step`` code over several networks and optimizers.
Instead the trainer (1) broadcasts every parameter and buffer from rank 0 at start, and (2) after
the backward passes of an iteration (all accumulation micro-batches) averages the gradients of
each stepping optimizer's parameters across processes with bucketed ``all_reduce`` calls — once
per optimizer step, so accumulation needs no ``no_sync``. A parameter without a gradient on every
rank keeps ``grad=None`` (AdamW then skips it, as in a single process). The NaN guard's loss
values are all-reduced too, so every rank takes the same skip/step decision and weights stay
identical.

FSDP (``accelerate launch`` with FSDP2, e.g. ``configs/accelerate/8gpu-fsdp.yaml``) replaces (1) and (2):
:mod:`fastgen.trainers.engine.sharding` broadcasts each block from rank 0 and shards the method's
networks with ``fully_shard``, FSDP reduce-scatters the gradients in backward, and checkpoints gather
the full state so that they keep the unsharded format. FSDP1, DeepSpeed, Megatron-LM and XLA are
refused with a clear error.

Several losses
--------------
``StepOutput.losses`` has one loss per stepping optimizer. Each loss is back-propagated only into
its own group's parameters (``torch.autograd.backward(loss, inputs=group_params)``), with
``retain_graph`` for all but the last, so a generator loss never leaves gradients on the
discriminator and vice versa. Groups that return the *same* tensor object share one backward. Under
FSDP ``inputs=`` cannot reach sharded parameters; :func:`~fastgen.trainers.engine.sharding.backward_per_group`
gives the same gradients with plain backward passes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastgen.data.streaming import StreamBatches, StreamingDataset, StreamPosition, start_position
from fastgen.errors import ConfigError, DataError, FastgenError
from fastgen.io import atomic_write_text, save_image_grid
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine import sharding
from fastgen.trainers.engine import speed
from fastgen.trainers.engine.optim import OptimizerSpec, ResolvedSpec, build_optimizer, lr_lambda, resolve_spec
from fastgen.trainers.method import Method, StepOutput

__all__ = [
    "CONFIG_CHANGES_FILE",
    "TrainConfig",
    "Trainer",
    "NonFiniteLossError",
    "ShardedBatchSampler",
    "make_accelerator",
    "lr_lambda",
]


#: RUN_DIR/config-changes.jsonl: configuration changes accepted at a resume, one JSON line per key
#: (``step``, ``checkpoint``, ``key``, ``old``, ``new``, ``reason``, ``time``); append-only, config.yaml
#: keeps the values the run started with
CONFIG_CHANGES_FILE = "config-changes.jsonl"


class NonFiniteLossError(FastgenError, RuntimeError):
    """Too many consecutive iterations had a non-finite (NaN/Inf) loss or gradient norm."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """The ``train:`` section of a recipe (shared by every method)."""

    #: number of iterations (optimizer-step rounds) to train for
    max_steps: int = 1000
    #: micro-batch size per process; the global batch is batch_size * processes * accumulation
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: optimizer of every parameter group unless its spec (``optimizers``) or the method's default names one;
    #: ``prodigy`` needs the optional ``prodigyopt`` package and usually ``learning_rate: 1.0``
    optimizer: Literal["adamw", "adam", "sgd", "prodigy", "adamw8bit"] = "adamw"
    #: learning rate of every optimizer unless its spec (``optimizers``) or ``learning_rates`` names one
    learning_rate: float = 1e-4
    #: per-optimizer learning rates, e.g. {disc: 2e-4}
    learning_rates: dict[str, float] = field(default_factory=dict)
    #: per-group optimizer specs (:class:`~fastgen.trainers.engine.optim.OptimizerSpec`), e.g.
    #: ``{disc: {optimizer: adam, betas: [0.0, 0.99], learning_rate: 2e-4}}``; unset fields inherit
    optimizers: dict[str, OptimizerSpec] = field(default_factory=dict)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    #: clip the gradient norm of each optimizer's parameters (null: no clipping, norm still checked)
    max_grad_norm: float | None = 1.0
    #: abort after this many consecutive iterations with a non-finite loss or gradient norm
    max_nonfinite_in_row: int = 10
    #: FSDP runs only (``accelerate launch`` with FSDP2): frozen networks (teacher, VAE, text encoders) are
    #: sharded too (``shard``) or kept whole in their dtype on every rank (``keep``); a frozen EMA/target copy
    #: of a trained network is always sharded like it
    fsdp_frozen: Literal["shard", "keep"] = "shard"
    checkpoint_every: int = 500
    #: keep only the newest K finished checkpoints (0: keep all)
    keep_checkpoints: int = 3
    #: write samples/step-XXXXXX.png every N iterations (0: never)
    sample_every: int = 0
    #: call the evaluator every N iterations and append its dict to metrics.jsonl (0: never)
    eval_every: int = 0
    log_every: int = 10
    log_with: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    seed: int = 0
    #: shuffle the data each epoch (seeded by ``seed``); false: the dataset's own order, e.g. to compare a
    #: streamed and a cached run sample by sample
    shuffle: bool = True
    num_workers: int = 0
    progress: bool = True
    #: torch.compile (inductor) of the networks the step runs (:mod:`fastgen.trainers.engine.speed`); samples
    #: and evaluations run them eagerly. The first steps compile (minutes on a CPU); single-process runs only
    compile: bool = False
    #: torch.compile mode of the trained networks: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    #: torch.compile backend: inductor (generates kernels); eager / aot_eager only trace (a quick graph-break check)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    #: convolution networks of the step in the channels-last memory format
    channels_last: bool = False

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "max_nonfinite_in_row", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}; set train.{name}=<positive int>")
        non_negative = ("warmup_steps", "checkpoint_every", "keep_checkpoints", "sample_every", "eval_every", "num_workers")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name, lr in [("learning_rate", self.learning_rate), *((f"learning_rates.{k}", v) for k, v in self.learning_rates.items())]:
            if not (lr > 0 and math.isfinite(lr)):
                raise ConfigError(f"train.{name} must be a positive finite number, got {lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"train.max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm}"
            )
        if self.lr_scheduler in ("cosine", "linear") and self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps}) "
                f"for lr_scheduler={self.lr_scheduler}"
            )


# --------------------------------------------------------------------------- helpers


def make_accelerator(config: TrainConfig, run_dir: str | os.PathLike[str] | None = None):
    """An ``accelerate.Accelerator`` for ``config`` (trackers write under RUN_DIR/logs)."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"mixed_precision": config.mixed_precision}
    if config.log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "train.log_with=wandb but the wandb package is not installed; `pip install wandb` "
                "or set train.log_with=tensorboard (or none)"
            )
    if config.log_with != "none" and run_dir is not None:
        kwargs.update(log_with=config.log_with, project_dir=str(Path(run_dir) / "logs"))
    if _launched_world_size() > 1 and not _has_accelerator_device():
        # Without this, accelerate silently falls back to N independent single-process runs on a
        # CPU-only machine (`accelerate launch --multi_gpu`); cpu=True gives real gloo DDP.
        kwargs["cpu"] = True
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"cannot set up accelerate with train.mixed_precision={config.mixed_precision}: {exc}") from exc


def _launched_world_size() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            return int(os.environ[key])
        except (KeyError, ValueError):
            continue
    return 1


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        from accelerate.utils import is_npu_available, is_xpu_available

        return bool(is_xpu_available() or is_npu_available())
    except Exception:  # pragma: no cover - older accelerate
        return False


class ShardedBatchSampler:
    """Infinite, deterministic batch sampler with rank sharding and a start position.

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(n)`` in global micro-batches
    of ``batch_size * world_size`` positions (the incomplete tail is dropped); rank ``r`` takes
    slice ``r`` of each. ``position`` counts global micro-batches since the start of training, so
    the batch after a resume from ``position`` is exactly the one an uninterrupted run draws, and
    no DataLoader or global RNG is involved.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, start: int = 0, shuffle: bool = True):
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.start = int(start)
        self.shuffle = shuffle
        self.batches_per_epoch = self.num_items // (self.batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the training dataset has {self.num_items} items, fewer than one global micro-batch "
                f"(train.batch_size={self.batch_size} x {self.world_size} processes); add data or lower train.batch_size"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                self._perm = np.arange(self.num_items)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def indices(self, position: int, rank: int | None = None) -> list[int]:
        """Dataset indices of ``rank``'s share of global micro-batch ``position``."""
        rank = self.rank if rank is None else rank
        epoch, i = divmod(position, self.batches_per_epoch)
        perm = self._permutation(epoch)
        lo = (i * self.world_size + rank) * self.batch_size
        return [int(x) for x in perm[lo : lo + self.batch_size]]

    def __iter__(self):
        position = self.start
        while True:
            yield self.indices(position)
            position += 1


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _buckets(tensors: list[torch.Tensor], max_numel: int = 1 << 25):
    """Split tensors into lists of the same dtype/device with at most ``max_numel`` elements."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            if bucket and size + t.numel() > max_numel:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            yield bucket


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train ``method`` under ``config``, writing the run folder ``run_dir``.

    Args:
        method: the method (an ``nn.Module`` holding all its networks).
        config: the ``train`` section.
        run_dir: the run folder (checkpoints/, samples/, logs/, metrics.jsonl).
        accelerator: an existing ``Accelerator`` (default: :func:`make_accelerator`).
        evaluator: ``evaluator(method, step) -> dict`` run every ``eval_every`` iterations (main process);
            None: no evaluation rows.
        config_changes: configuration changes accepted for a resume (``{"key", "old", "new", "reason"}``
            each, see :func:`~fastgen.trainers.engine.run.prepare_run`); appended with the step to
            RUN_DIR/config-changes.jsonl once the checkpoint has loaded.

    Sample grids use ``method.sample_settings()`` (prompts, steps, seed); ``method.sample`` gets a
    ``torch.Generator`` on the accelerator device seeded with that seed. Sampling and evaluation run on
    the main process, in eval mode, under ``torch.no_grad()``, and leave the training RNG streams untouched.
    """

    def __init__(
        self,
        method: Method,
        config: TrainConfig,
        run_dir: str | os.PathLike[str],
        *,
        accelerator=None,
        evaluator: Callable[[Method, int], Mapping[str, Any]] | None = None,
        config_changes: list[Mapping[str, Any]] | tuple = (),
    ):
        self.evaluator = evaluator
        self.config_changes = list(config_changes)
        #: step networks compiled by ``train.compile`` (name -> how); empty when eager
        self.compiled: dict[str, str] = {}
        self._rng_file: Path | None = None
        if not isinstance(method, Method):
            raise TypeError(f"Trainer needs a fastgen Method, got {type(method).__name__}")
        self.method = method
        self.config = config
        self.run_dir = Path(run_dir)
        self.ckpt_dir = ckpt.checkpoints_dir(self.run_dir)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config, self.run_dir)
        acc = self.accelerator
        self._check_distributed_type()
        if _launched_world_size() > 1 and acc.num_processes == 1:
            raise FastgenError(
                f"this process was launched as one of {_launched_world_size()} (WORLD_SIZE), but accelerate set up a "
                "single-process run, so every process would train alone; create the Accelerator with "
                "fastgen.trainers.engine.trainer.make_accelerator (it passes cpu=True on CPU-only machines)"
            )
        self.device = acc.device
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process

        #: FSDP2 sharding of the method's networks (None: whole parameters, gradients all-reduced here)
        self.sharding = sharding.Sharding.from_accelerator(acc, config.mixed_precision, config.fsdp_frozen)
        if self.sharding is None:
            self.method.to(self.device)
            self.groups = self._collect_groups()
            if self.world_size > 1:
                self._broadcast_from_main()
            if config.channels_last:
                speed.apply_channels_last(self.method)
            if config.compile:
                if self.world_size > 1:
                    raise ConfigError("train.compile is supported in single-process runs only; set train.compile=false "
                                      "for multi-process training")
                self.compiled = speed.compile_step_networks(self.method, config.compile_mode, backend=config.compile_backend)
        elif config.compile or config.channels_last:
            raise ConfigError("train.compile and train.channels_last are not supported with FSDP sharding; set them to false")
        else:
            self.sharding.apply(self.method, self._collect_groups(), self.device)
            self.groups = self._collect_groups()  # FSDP replaced the parameters: re-read the groups
            self.sharding.check_groups(self.groups, self.method.name)
            self._trainable = sharding.trainable_parameters(self.method)

        for key, given in (("learning_rates", config.learning_rates), ("optimizers", config.optimizers)):
            unknown = set(given) - set(self.groups) - set(method.inactive_groups())
            if unknown:
                import difflib

                bad = sorted(unknown)[0]
                close = difflib.get_close_matches(bad, list(self.groups), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"the optimizers are: {', '.join(self.groups)}"
                raise ConfigError(f"train.{key} names optimizer '{bad}', which method '{method.name}' does not have; {hint}")
        defaults = dict(method.optimizer_specs())
        self.specs: dict[str, ResolvedSpec] = {
            name: resolve_spec(name, config.optimizers.get(name), defaults.get(name), config) for name in self.groups
        }
        # each group's LR schedule counts its own updates: how many it makes in max_steps iterations
        updates = {name: 0 for name in self.groups}
        for it in range(config.max_steps):
            for name in method.optimizers_to_step(it):
                if name in updates:
                    updates[name] += 1
        self.total_updates = updates
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for name, params in self.groups.items():
            spec = self.specs[name]
            if spec.lr_scheduler in ("cosine", "linear") and spec.warmup_steps >= max(1, updates[name]):
                raise ConfigError(
                    f"optimizer '{name}' makes {updates[name]} updates in train.max_steps={config.max_steps} iterations, "
                    f"not more than its warmup_steps ({spec.warmup_steps}); lower the warm-up or train longer"
                )
            opt = build_optimizer(params, spec, name)
            self.optimizers[name] = opt
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(spec.lr_scheduler, spec.warmup_steps, updates[name])
            )
        self.scaler = getattr(acc, "scaler", None)  # set by accelerate for fp16 on GPUs only
        if config.mixed_precision != "no" and not getattr(acc, "native_amp", True):
            warnings.warn(
                f"train.mixed_precision={config.mixed_precision} has no effect on device '{self.device.type}' "
                "(accelerate disables autocast there); training runs in fp32 — use bf16 on CPU"
            )

        # progress counters (restored on resume)
        self.step = 0
        self.data_position = 0
        self.skipped_nonfinite = 0
        self.nonfinite_in_row = 0
        self.last_checkpoint: Path | None = None
        self.sampler: ShardedBatchSampler | None = None
        #: the stream's batches when the dataset is a StreamingDataset (else None)
        self.stream: StreamBatches | None = None
        #: where this rank's stream starts (restored from a checkpoint's ``stream`` entry)
        self.stream_start = StreamPosition()
        self.last_logs: dict[str, float] = {}

    # ---- setup ----------------------------------------------------------------------------
    def _check_distributed_type(self) -> None:
        from accelerate.utils import DistributedType

        dt = self.accelerator.distributed_type
        if dt in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
            raise FastgenError(
                f"accelerate distributed type {dt} is not supported by the fastgen trainer (it runs its own loop over "
                "several networks and optimizers); launch with `accelerate launch --multi_gpu` (DDP), with FSDP2 "
                "(configs/accelerate/8gpu-fsdp.yaml), or a single process"
            )

    def _collect_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = self.method.parameter_groups()
        if not isinstance(groups, Mapping) or not groups:
            raise FastgenError(
                f"method '{self.method.name}'.parameter_groups() returned {groups!r}; it must return a non-empty "
                "dict of optimizer name -> list of parameters"
            )
        seen: dict[int, str] = {}
        out: dict[str, list[torch.nn.Parameter]] = {}
        for name, params in groups.items():
            params = [p for p in params]
            if not params:
                raise FastgenError(f"parameter group '{name}' of method '{self.method.name}' is empty")
            for p in params:
                if not isinstance(p, torch.nn.Parameter) or not p.requires_grad:
                    raise FastgenError(
                        f"parameter group '{name}' of method '{self.method.name}' holds a tensor that is not a "
                        "trainable nn.Parameter (requires_grad=False?); list only trainable parameters"
                    )
                if id(p) in seen:
                    raise FastgenError(
                        f"a parameter is in both groups '{seen[id(p)]}' and '{name}' of method '{self.method.name}'; "
                        "each parameter must belong to one optimizer"
                    )
                seen[id(p)] = name
            out[str(name)] = params
        return out

    @torch.no_grad()
    def _broadcast_from_main(self) -> None:
        import torch.distributed as dist

        for t in self.method.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and t.numel():
                if t.data.is_contiguous():
                    dist.broadcast(t.data, src=0)
                else:
                    tmp = t.data.contiguous()
                    dist.broadcast(tmp, src=0)
                    t.data.copy_(tmp)

    # ---- run folder -----------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        if self.is_main:
            for sub in ("checkpoints", "samples", "logs"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp(self.ckpt_dir)
        self.accelerator.wait_for_everyone()

    # ---- main entry -----------------------------------------------------------------------
    def train(self, resume: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Run until ``config.max_steps``; ``resume``: ``"latest"``, a checkpoint name or path."""
        from accelerate.utils import set_seed

        cfg, acc = self.config, self.accelerator
        resume_path = ckpt.find_checkpoint(self.run_dir, resume, purpose="resume") if resume is not None else None
        self._prepare_run_dir()
        set_seed(cfg.seed + self.rank)

        # building the data (a latent cache, teacher samples) must not move the training RNG streams: a run
        # that finds its cache takes the same steps as the run that built it
        rng_before = ckpt.capture_rng_state()
        dataset = self.method.train_dataset()
        ckpt.restore_rng_state(rng_before)
        streaming = isinstance(dataset, StreamingDataset)
        num_items = 0
        if not streaming:
            try:
                num_items = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                raise DataError(
                    f"method '{self.method.name}'.train_dataset() returned a {type(dataset).__name__} without len(); "
                    "it must be a map-style dataset or a stream with batches() (fastgen.data.streaming.StreamingDataset)"
                ) from None

        rng_state = None
        if resume_path is not None:
            rng_state = self._load_checkpoint(resume_path, streaming)

        pin_memory = self.device.type == "cuda"
        if streaming:
            self.sampler = None
            self.stream = dataset.batches(
                cfg.batch_size, rank=self.rank, world_size=self.world_size, seed=cfg.seed, shuffle=cfg.shuffle,
                start=self.stream_start, num_workers=cfg.num_workers, pin_memory=pin_memory,
            )
            loader = self.stream
        else:
            self.stream = None
            self.sampler = ShardedBatchSampler(
                num_items, cfg.batch_size, self.world_size, self.rank, seed=cfg.seed, start=self.data_position,
                shuffle=cfg.shuffle,
            )
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=self.sampler,
                num_workers=cfg.num_workers,
                collate_fn=torch.utils.data.default_collate,
                pin_memory=pin_memory,
                # a private generator: creating the iterator must not draw from the global torch RNG
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        if cfg.log_with != "none":
            acc.init_trackers("train")
        data_iter = iter(loader)

        if rng_state is not None:
            try:
                ckpt.restore_rng_state(rng_state)  # last: nothing above may shift the streams
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise ckpt.corrupt_file_error(self._rng_file, exc) from exc

        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and self.is_main),
            desc=f"train {self.method.name}",
            dynamic_ncols=True,
        )
        samples_per_iter = cfg.batch_size * self.world_size * cfg.gradient_accumulation_steps
        t_last, steps_since = time.perf_counter(), 0
        saved_at = self.step if resume_path is not None else -1
        try:
            while self.step < cfg.max_steps:
                info = self._iteration(data_iter)
                self.step += 1
                steps_since += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    sps = samples_per_iter * steps_since / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    info["samples_per_s"] = sps
                    self.last_logs = info
                    postfix = {k.replace("loss/", "loss_"): f"{v:.4g}" for k, v in info.items() if k.startswith("loss/")}
                    postfix["samples/s"] = f"{sps:.1f}"
                    bar.set_postfix(postfix, refresh=False)
                    if cfg.log_with != "none":
                        acc.log(info, step=self.step)
                final = self.step == cfg.max_steps
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or final):
                    self.save_samples()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or final):
                    self.run_evaluation()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or final:
                    self.save_checkpoint()
                    saved_at = self.step
        finally:
            bar.close()
            if self.stream is not None:
                self.stream.close()
            if cfg.log_with != "none":
                acc.end_training()
        if saved_at != self.step:  # e.g. resumed at (or past) max_steps: make sure a checkpoint exists
            self.save_checkpoint()
        return {
            "step": self.step,
            "skipped_nonfinite": self.skipped_nonfinite,
            "run_dir": str(self.run_dir),
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "logs": self.last_logs,
        }

    # ---- one iteration --------------------------------------------------------------------
    def _iteration(self, data_iter) -> dict[str, float]:
        cfg, acc, step = self.config, self.accelerator, self.step
        names = list(self.method.optimizers_to_step(step))
        unknown = [n for n in names if n not in self.groups]
        if unknown:
            raise FastgenError(
                f"method '{self.method.name}'.optimizers_to_step({step}) returned {unknown}, not among its "
                f"parameter groups {list(self.groups)}"
            )
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

        accum = cfg.gradient_accumulation_steps
        loss_sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        log_sums: dict[str, float] = {}
        for _ in range(accum):
            batch = _to_device(next(data_iter), self.device)
            self.data_position += 1
            with acc.autocast():
                out = self.method.train_step(batch, step)
            if not isinstance(out, StepOutput):
                raise FastgenError(
                    f"method '{self.method.name}'.train_step must return a StepOutput(losses=..., logs=...), "
                    f"got {type(out).__name__}"
                )
            missing = [n for n in names if n not in out.losses]
            if missing:
                raise FastgenError(
                    f"method '{self.method.name}'.train_step(step={step}) returned no loss for optimizer(s) {missing} "
                    f"that step at this iteration (losses: {list(out.losses)})"
                )
            self._backward(out.losses, names, 1.0 / accum)
            for i, n in enumerate(names):
                loss_sums[i] += out.losses[n].detach().double()
            for k, v in out.logs.items():
                log_sums[k] = log_sums.get(k, 0.0) + float(v)
            del out

        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sums)
        mean_losses = (loss_sums / (accum * self.world_size)).tolist()

        info: dict[str, float] = {}
        skipped: list[str] = []
        for i, name in enumerate(names):
            params = self.groups[name]
            opt = self.optimizers[name]
            if self.world_size > 1 and self.sharding is None:
                self._allreduce_grads(params)  # (FSDP reduce-scattered them in backward)
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            grads = [p.grad for p in params if p.grad is not None]
            clip = self.specs[name].max_grad_norm
            if grads and clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
            elif grads:
                norm = torch.nn.utils.get_total_norm(grads)
            else:
                norm = torch.zeros(())
            norm_f = float(sharding.plain(norm))
            loss_f = mean_losses[i]
            info[f"loss/{name}"] = loss_f
            info[f"grad_norm/{name}"] = norm_f
            info[f"lr/{name}"] = opt.param_groups[0]["lr"]
            if math.isfinite(loss_f) and math.isfinite(norm_f):
                if self.scaler is not None:
                    self.scaler.step(opt)
                else:
                    opt.step()
                self.method.after_optimizer_step(name, step)
            else:
                opt.zero_grad(set_to_none=True)
                skipped.append(f"{name} (loss={loss_f:.4g}, grad_norm={norm_f:.4g})")
        if self.scaler is not None:
            self.scaler.update()
        with warnings.catch_warnings():
            # a group's schedule advances with its own updates (skipped non-finite ones included)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\).*")
            for name in names:
                self.schedulers[name].step()

        if skipped:
            self.skipped_nonfinite += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= cfg.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"training aborted at step {step}: {self.nonfinite_in_row} consecutive iterations had a non-finite "
                    f"loss or gradient norm (train.max_nonfinite_in_row={cfg.max_nonfinite_in_row}; "
                    f"{self.skipped_nonfinite} skipped in total; last: {', '.join(skipped)}). Fixes: lower the learning "
                    f"rate (train.learning_rate, now {cfg.learning_rate}), train in fp32 or bf16 instead of fp16 "
                    f"(train.mixed_precision, now {cfg.mixed_precision}), keep gradient clipping on "
                    "(train.max_grad_norm), check the data for NaN/Inf or corrupt items; then resume from the last "
                    "good checkpoint with --resume latest"
                )
        else:
            self.nonfinite_in_row = 0
        info["skipped_nonfinite"] = float(self.skipped_nonfinite)
        for k, v in log_sums.items():
            info.setdefault(k, v / accum)
        return info

    def _backward(self, losses: Mapping[str, torch.Tensor], names: list[str], scale: float) -> None:
        # one backward per distinct loss tensor, into the parameters of the groups it steps
        by_tensor: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for n in names:
            loss = losses[n]
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise FastgenError(
                    f"method '{self.method.name}': the loss of optimizer '{n}' must be a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                )
            if not loss.requires_grad:
                raise FastgenError(
                    f"method '{self.method.name}': the loss of optimizer '{n}' does not depend on any trainable "
                    "parameter (requires_grad=False); check that train_step does not run under no_grad"
                )
            by_tensor.setdefault(id(loss), (loss, []))[1].append(n)
        items = list(by_tensor.values())
        if self.sharding is not None:
            sharding.backward_per_group(items, self.groups, self._trainable, scale)
            return
        for i, (loss, group_names) in enumerate(items):
            inputs = [p for n in group_names for p in self.groups[n]]
            scaled = loss.reshape(()) * scale
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            torch.autograd.backward(scaled, inputs=inputs, retain_graph=i < len(items) - 1)

    @torch.no_grad()
    def _allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has)
        grads = []
        for p, h in zip(params, has.tolist()):
            if h > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for g, f in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(f)

    # ---- samples and evaluation -------------------------------------------------------------
    def _isolated(self, fn):
        """Run ``fn`` in eval mode without grad, leaving RNG streams and train/eval modes as they were."""
        rng = ckpt.capture_rng_state()
        modes = [(m, m.training) for m in self.method.modules()]
        self.method.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast(), speed.eager(bool(self.compiled)):
                return fn()
        finally:
            for m, mode in modes:
                m.training = mode
            ckpt.restore_rng_state(rng)

    def save_samples(self) -> Path | None:
        """Write samples/step-XXXXXX.png (main process; under FSDP every rank samples, as the networks'
        forwards are collective); returns the path or None."""
        if not self.is_main and self.sharding is None:
            return None
        prompts, steps, seed = self.method.sample_settings()
        if not prompts:
            if self.is_main:
                warnings.warn(f"no sample prompts (sample.prompts is empty for method '{self.method.name}'); skipping the sample grid")
            return None

        def run():
            gen = torch.Generator(device=self.device).manual_seed(seed)
            return self.method.sample(prompts, steps, gen)

        images = self._isolated(run)
        if not self.is_main:
            return None
        n = images.shape[0]
        nrow = len(prompts) if (n % len(prompts) == 0 and len(prompts) <= 16) else max(1, int(math.ceil(math.sqrt(n))))
        return save_image_grid(images.float(), self.run_dir / "samples" / f"step-{self.step:06d}.png", nrow=nrow)

    def run_evaluation(self) -> dict[str, float] | None:
        """Call ``evaluator(method, step)`` (main process; every rank under FSDP) and append a row to metrics.jsonl."""
        if self.evaluator is None or not (self.is_main or self.sharding is not None):
            return None
        result = self._isolated(lambda: self.evaluator(self.method, self.step))
        if not result or not self.is_main:
            return None
        row = {"step": self.step, "time": time.time()}
        for k, v in dict(result).items():
            row[k] = float(v) if isinstance(v, (int, float, torch.Tensor, np.floating, np.integer)) else v
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.config.log_with != "none":
            self.accelerator.log({f"eval/{k}": v for k, v in row.items() if k not in ("step", "time") and isinstance(v, float)}, step=self.step)
        return row

    # ---- checkpoints ----------------------------------------------------------------------
    def _stream_positions(self) -> dict[str, Any] | None:
        """Every rank's stream position (gathered to all ranks; all must call this), or None without a stream."""
        if self.stream is None:
            return None
        mine = self.stream.position.to_dict()
        ranks = [mine]
        if self.world_size > 1:
            import torch.distributed as dist

            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        return {"world_size": self.world_size, "ranks": ranks}

    def trainer_state(self, stream: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.config
        if stream is not None:
            epoch = int(stream["ranks"][0]["epoch"])
        else:
            epoch = self.sampler.epoch_of(self.data_position) if self.sampler else 0
        state = {
            "format": 1,
            "method": self.method.name,
            "step": self.step,
            "epoch": epoch,
            "data_position": self.data_position,
            "samples_seen": self.data_position * cfg.batch_size * self.world_size,
            "skipped_nonfinite": self.skipped_nonfinite,
            "nonfinite_in_row": self.nonfinite_in_row,
            "world_size": self.world_size,
            "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed,
            "optimizers": list(self.optimizers),
            "model_file": ckpt.MODEL_FILE,
            "optimizer_file": ckpt.OPTIMIZER_FILE,
            "rng_files": {str(r): ckpt.rng_file_name(r) for r in range(self.world_size)},
            "time": time.time(),
        }
        if stream is not None:
            # per rank: raw samples of the epoch consumed (trained on or skipped as unreadable), samples trained on
            state["stream"] = stream
        return state

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically (all ranks must call this)."""
        acc = self.accelerator
        stream = self._stream_positions()
        tmp = ckpt.checkpoints_dir(self.run_dir) / f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(self.step)}"
        if self.is_main:
            tmp = ckpt.begin_checkpoint(self.ckpt_dir, self.step)
        acc.wait_for_everyone()
        if not self.is_main:
            ckpt.write_torch(tmp / ckpt.rng_file_name(self.rank), ckpt.capture_rng_state())
        acc.wait_for_everyone()
        final = self.ckpt_dir / ckpt.checkpoint_name(self.step)
        model_state = opt_states = None
        if self.sharding is not None:  # gather the shards on every rank: rank 0 writes the unsharded format
            model_state = sharding.full_state_dict(self.method.checkpoint_state_dict(), keep=self.is_main)
            opt_states = {n: sharding.full_optimizer_state(o.state_dict(), keep=self.is_main) for n, o in self.optimizers.items()}
        if self.is_main:
            if model_state is None:
                model_state = self.method.checkpoint_state_dict()
                opt_states = {n: o.state_dict() for n, o in self.optimizers.items()}
            ckpt.write_safetensors(tmp / ckpt.MODEL_FILE, model_state, metadata={"method": self.method.name, "step": str(self.step)})
            ckpt.write_torch(
                tmp / ckpt.OPTIMIZER_FILE,
                {
                    "optimizers": opt_states,
                    "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                },
            )
            ckpt.write_torch(tmp / ckpt.rng_file_name(0), ckpt.capture_rng_state())
            ckpt.write_json(tmp / ckpt.STATE_FILE, self.trainer_state(stream))
            final = ckpt.finish_checkpoint(self.ckpt_dir, tmp, self.step, keep=self.config.keep_checkpoints)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _load_checkpoint(self, path: Path, streaming: bool = False) -> dict[str, Any] | None:
        """Restore method, optimizers, schedulers, counters and (``streaming``) this rank's stream position;
        returns this rank's RNG state.

        Every file is read and checked before anything is restored or the timeline changes (``latest``,
        later checkpoints), so a corrupt file fails the resume with one CheckpointError naming it (and
        the finished checkpoint before it, ``--resume previous``).
        """
        state = ckpt.load_trainer_state(path)
        try:
            step, data_position = int(state["step"]), int(state["data_position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ckpt.corrupt_file_error(
                path / ckpt.STATE_FILE, f"'step' or 'data_position' missing or not an integer: {type(exc).__name__}: {exc}"
            ) from exc
        stream_start, stream_note = StreamPosition(), None
        if streaming:
            try:
                stream_start, stream_note = start_position(state.get("stream"), self.rank, self.world_size)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise ckpt.corrupt_file_error(path / ckpt.STATE_FILE, f"bad 'stream' entry: {exc}") from exc
            if state.get("stream") is None and data_position:
                stream_note = (
                    f"checkpoint '{path}' holds no stream position (it was written by a run over a map-style dataset); "
                    "the data stream starts from its beginning"
                )
        model_state = ckpt.load_model_state(path, device="cpu", purpose="resume")
        opt_file = path / str(state.get("optimizer_file", ckpt.OPTIMIZER_FILE))
        if not opt_file.is_file():
            raise ckpt.CheckpointError(f"'{opt_file}' is missing; checkpoint '{path}' cannot be resumed from (only loaded)")
        # "cpu", not the accelerator's "cpu:<rank>" of a multi-process CPU run, which torch.load cannot map to
        opt_state = ckpt.load_torch(opt_file, map_location="cpu" if self.device.type == "cpu" else self.device)
        if not (isinstance(opt_state, dict) and isinstance(opt_state.get("optimizers"), dict)
                and isinstance(opt_state.get("schedulers"), dict)):
            raise ckpt.corrupt_file_error(opt_file, "not an optimizer state written by the fastgen trainer")
        rng_files = state.get("rng_files")
        rng_name = rng_files.get(str(self.rank)) if isinstance(rng_files, dict) else None
        rng_file = path / str(rng_name or ckpt.rng_file_name(self.rank))
        rng_state = ckpt.load_rng_state(rng_file) if rng_file.is_file() else None
        if set(opt_state["optimizers"]) != set(self.optimizers):
            raise ckpt.CheckpointError(
                f"checkpoint '{path}' has optimizers {sorted(opt_state['optimizers'])}, this method has "
                f"{sorted(self.optimizers)}; resume with the same method and options"
            )
        if self.sharding is not None:  # a full (unsharded-format) state: cut this rank's shards
            model_state = sharding.shard_like(model_state, self.method.checkpoint_state_dict())
        try:
            self.method.load_checkpoint_state_dict(model_state)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ckpt.CheckpointError(
                f"the weights in '{path / ckpt.MODEL_FILE}' do not fit method '{self.method.name}' as configured "
                f"({type(exc).__name__}: {first}); resume with the method options the run was trained with"
            ) from exc
        try:
            for n, opt in self.optimizers.items():
                saved = opt_state["optimizers"][n]
                if self.sharding is not None:
                    saved = sharding.shard_optimizer_state(opt, saved)
                opt.load_state_dict(saved)
                self.schedulers[n].load_state_dict(opt_state["schedulers"][n])
        except (ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(
                f"cannot restore the optimizer state from '{path}': {exc}; resume with the same method options"
            ) from exc
        self._apply_configured_hyperparameters()
        if self.scaler is not None and opt_state.get("scaler"):
            self.scaler.load_state_dict(opt_state["scaler"])
        self.step = step
        self.data_position = data_position
        self.stream_start = stream_start
        if stream_note:
            warnings.warn(stream_note)
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.last_checkpoint = path
        cfg = self.config
        if (state.get("world_size"), state.get("batch_size")) != (self.world_size, cfg.batch_size):
            warnings.warn(
                f"resuming a run of {state.get('world_size')} process(es) x batch {state.get('batch_size')} with "
                f"{self.world_size} x {cfg.batch_size}: training continues, but the data order differs from "
                "the original run"
            )
        if self.is_main:
            self._adopt_timeline(path)
            self._record_config_changes(path)
        self.accelerator.wait_for_everyone()
        if rng_state is not None:
            self._rng_file = rng_file
            return rng_state
        warnings.warn(f"no RNG state for rank {self.rank} in '{path}'; reseeding (random streams differ from the original run)")
        from accelerate.utils import set_seed

        set_seed(cfg.seed + self.rank + 1000003 * self.step)
        return None

    def _apply_configured_hyperparameters(self) -> None:
        """After loading optimizer states: the configured learning rate, betas, eps, weight decay and
        momentum win over the saved ones (they differ only where a resume accepted a configuration
        change), and each group's current LR is the schedule's value at its restored position. Internal
        entries (e.g. Prodigy's estimates) and the optimizer state stay as saved."""
        for name, opt in self.optimizers.items():
            spec, sched = self.specs[name], self.schedulers[name]
            wanted = {"weight_decay": spec.weight_decay, "betas": tuple(spec.betas), "eps": spec.eps, "momentum": spec.momentum}
            for i, group in enumerate(opt.param_groups):
                for key, value in wanted.items():
                    if key in group and (tuple(group[key]) if key == "betas" else group[key]) != value:
                        group[key] = value
                if sched.base_lrs[i] != spec.learning_rate:
                    sched.base_lrs[i] = spec.learning_rate
                    group["initial_lr"] = spec.learning_rate
                lr = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
                if group["lr"] != lr:
                    group["lr"] = lr
            sched._last_lr = [g["lr"] for g in opt.param_groups]

    def _record_config_changes(self, path: Path) -> None:
        """Append the configuration changes accepted for this resume to RUN_DIR/config-changes.jsonl."""
        if not self.config_changes:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        lines = "".join(
            json.dumps({"step": self.step, "checkpoint": path.name, **dict(change), "time": stamp}, default=str) + "\n"
            for change in self.config_changes
        )
        with open(self.run_dir / CONFIG_CHANGES_FILE, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        self.config_changes = []

    def _adopt_timeline(self, path: Path) -> None:
        """After resuming from ``path``: `latest` names it, later checkpoints/metrics of this run are set aside."""
        if path.parent.resolve() != self.ckpt_dir.resolve():
            return
        if ckpt.read_latest(self.ckpt_dir) != path.name:
            for step, p in ckpt.list_checkpoints(self.ckpt_dir):
                if step > self.step:
                    p.rename(p.with_name(f"discarded-{p.name}-{time.time_ns()}"))
            ckpt.write_latest(self.ckpt_dir, path.name)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            keep = []
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if int(row.get("step", 0)) <= self.step:
                    keep.append(line)
            if len(keep) != len(lines):
                atomic_write_text(metrics, "".join(k + "\n" for k in keep))


def train_config_fields() -> list[str]:
    """Names of the TrainConfig fields (for docs and CLI help)."""
    return [f.name for f in dataclasses.fields(TrainConfig)]
