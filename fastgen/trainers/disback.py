"""DisBack: score distillation along the teacher's degradation path, backwards.

Score distillation (:mod:`fastgen.trainers.score_distill`) starts with a generator whose samples lie
far from where the teacher's score is accurate. DisBack first records how the teacher's score moves
toward the initial generator's distribution, then trains the generator against that path in reverse::

    stage 1, iterations 0 .. D-1 (degradation_steps): the generator G0 is frozen; the fake score s' (the
        teacher's copy) learns the distribution of G0's samples by denoising score matching, and a snapshot
        of it is written every D / N iterations: path nodes s'_1 .. s'_N (weights only, the teacher's dtype)
    stage 2, iterations D ..: score distillation (DMD's losses and update ratio) with
        path      P = [s'_N, s'_{N-1}, ..., s'_1, teacher]
        fake      starts as P[0] = s'_N (it already fits G0: no initial mismatch)
        real slot P[min(1 + g // interval, N)] at the g-th generator update of stage 2: every node in turn,
                  reloaded from its file, ending at the teacher (which stays to the end)

With ``path_nodes: 0`` there is no stage 1 and the path is ``[teacher]``: the method is DMD exactly (the same
code; tested). The loaded node follows from the iteration alone, so a resumed run reloads it from the path
folder (``<run folder>/disback-path`` unless ``path_dir`` is set). Nodes are checked on load: a missing,
corrupt or foreign (another architecture) node file is an error naming it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastgen.errors import ConfigError, ModelLoadError
from fastgen.io import atomic_file
from fastgen.trainers.method import StepOutput, register_method
from fastgen.trainers.score_distill import DMD, DMDConfig

__all__ = ["DisBack", "DisBackConfig"]

FAKE = "fake_score"


@dataclass
class DisBackConfig(DMDConfig):
    """DisBack options (the ``disback:`` section): DMD's options (same names) plus

    Attributes:
        path_nodes: N, recorded nodes of the degradation path (0: no stage 1, plain DMD).
        degradation_steps: D, stage-1 iterations (a multiple of N); a node is written every D / N iterations.
        interval: generator updates of stage 2 per path node before the next one is loaded.
        path_dir: where the nodes are written and read; ``null`` = ``<run folder>/disback-path``.
    """

    section: ClassVar[str] = "disback"

    path_nodes: int = 4
    degradation_steps: int = 200
    interval: int = 50
    path_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.path_nodes >= 0, f"disback.path_nodes must be >= 0 (0 = plain DMD), got {self.path_nodes}"),
            (self.interval >= 1, f"disback.interval must be >= 1 generator update, got {self.interval}"),
            (self.degradation_steps >= 0, f"disback.degradation_steps must be >= 0, got {self.degradation_steps}"),
            (self.path_nodes == 0 or (self.degradation_steps >= self.path_nodes and self.degradation_steps % self.path_nodes == 0),
             f"disback.degradation_steps ({self.degradation_steps}) must be a positive multiple of disback.path_nodes "
             f"({self.path_nodes}): a node is written every degradation_steps / path_nodes iterations"),
            (self.path_nodes == 0 or self.fake_lora_rank == 0, "DisBack's path nodes are full score networks; set "
                                                               "disback.fake_lora_rank: 0 (or path_nodes: 0 for plain DMD)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@register_method
class DisBack(DMD):
    """DisBack; see the module docstring for the algorithm."""

    name = "disback"
    config_class = DisBackConfig
    label = "DisBack"

    def __init__(self, config: DisBackConfig, **shared: Any):
        super().__init__(config, **shared)
        n = config.path_nodes
        self.stage1 = config.degradation_steps if n > 0 else 0
        self.node_every = self.stage1 // n if n > 0 else 0
        # the real-score slot for path nodes: a frozen copy in the teacher's dtype (the teacher itself needs none)
        self.target = copy.deepcopy(self.fake).requires_grad_(False).eval() if n > 0 else None
        if self.target is not None and self.teacher.dtype != torch.float32:
            self.target.to(self.teacher.dtype)
        self.loaded_node: int | None = None
        self.reloads: list[tuple[int, int]] = []  # (iteration, node; 0 = the teacher) of every switch of the slot
        self.path_dir: Path | None = Path(config.path_dir) if config.path_dir else None

    def configure_training(self, max_steps: int, run_dir: Any = None) -> None:
        cfg, n = self.config, self.config.path_nodes
        if self.path_dir is None and run_dir is not None:
            self.path_dir = Path(run_dir) / "disback-path"
        if n == 0:
            return
        if self.stage1 >= max_steps:
            raise ConfigError(f"disback.degradation_steps ({self.stage1}) leaves no stage-2 iteration below train.max_steps "
                              f"({max_steps}); raise train.max_steps or lower degradation_steps")
        updates = (max_steps - self.stage1 + cfg.fake_updates_per_generator_update - 1) // cfg.fake_updates_per_generator_update
        if cfg.interval * n > updates:
            raise ConfigError(f"disback.interval ({cfg.interval}) x path_nodes ({n}) = {cfg.interval * n} generator updates, more "
                              f"than stage 2 has ({updates} of {max_steps - self.stage1} iterations): the path would not reach "
                              f"the teacher; lower disback.interval to at most {updates // n} or raise train.max_steps")

    # ---- the schedule ------------------------------------------------------------------------
    def generator_steps_at(self, step: int) -> bool:
        return step >= self.stage1 and super().generator_steps_at(step - self.stage1)

    def node_at(self, step: int) -> int:
        """The node in the real-score slot at ``step``: ``k`` for s'_k, 0 for the teacher."""
        n = self.config.path_nodes
        if n == 0:
            return 0
        g = max(step - self.stage1, 0) // self.config.fake_updates_per_generator_update
        return n - min(1 + g // self.config.interval, n)

    def node_file(self, k: int) -> Path:
        if self.path_dir is None:
            raise ConfigError("DisBack has no folder for its path nodes; set disback.path_dir (or train through a run folder)")
        return self.path_dir / f"node-{k:03d}.safetensors"

    def after_optimizer_step(self, name: str, step: int) -> None:
        super().after_optimizer_step(name, step)
        if name == FAKE and step < self.stage1 and (step + 1) % self.node_every == 0:
            self.write_node((step + 1) // self.node_every, step)

    def write_node(self, k: int, step: int) -> None:
        """Snapshot of the fake score as path node ``k`` (weights only, the teacher's dtype), by the main process."""
        from safetensors.torch import save_file

        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        path = self.node_file(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {n: t.detach().to(self.teacher.dtype).cpu().contiguous() for n, t in self.fake.state_dict().items()}
        with atomic_file(path) as tmp:
            save_file(state, str(tmp), metadata={"node": str(k), "step": str(step), "teacher": self.loaded.name})

    def load_node(self, k: int) -> None:
        """Load path node ``k`` into the real-score slot, checking every key and shape."""
        from safetensors.torch import load_file

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the main process wrote the node
        path = self.node_file(k)
        if not path.is_file():
            raise ModelLoadError(f"DisBack path node {k} is missing: '{path}' does not exist; resume from a checkpoint of stage 1 "
                                 f"(before iteration {self.stage1}) to record it again, or point disback.path_dir at the run's path")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise ModelLoadError(f"DisBack path node '{path}' is corrupt or not a safetensors file ({exc}); delete it and record "
                                 "the path again from a stage-1 checkpoint") from exc
        own = self.target.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [n for n in own if n in state and tuple(state[n].shape) != tuple(own[n].shape)]
        if missing or unexpected or shapes:
            raise ModelLoadError(f"DisBack path node '{path}' is not a score network of teacher '{self.loaded.name}': "
                                 f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                                 f"{len(shapes)} of another shape (e.g. {shapes[:2]}); record the path with this teacher")
        self.target.load_state_dict(state, strict=True)

    def real_score(self) -> torch.nn.Module | None:
        return self.target if self.loaded_node else None

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        if step >= self.stage1:
            k = self.node_at(step)
            if k != self.loaded_node:
                if k > 0:
                    self.load_node(k)
                self.loaded_node = k
                self.reloads.append((step, k))
        out = super().train_step(batch, step)
        out.logs["path_node"] = float(self.node_at(step)) if step >= self.stage1 else -1.0
        return out
