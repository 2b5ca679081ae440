"""Exponential moving average (EMA) of parameters, reusable by every method.

Two forms, same math (``shadow <- decay * shadow + (1 - decay) * param``):

* :func:`ema_update_` updates one set of tensors in place from another, e.g. an LCD target
  network that is itself an ``nn.Module`` used in the loss::

      ema_update_(self.target_unet.parameters(), self.unet.parameters(), decay=0.95)

* :class:`EMA` keeps its own shadow copy of a module's floating-point parameters (by name),
  can temporarily swap the averaged weights in for sampling/export, and has a tensors-only
  ``state_dict`` that fits into ``Method.checkpoint_state_dict()`` (safetensors)::

      self.ema = EMA(self.student, decay=0.999)
      ...
      def after_optimizer_step(self, name, step):
          self.ema.update()
      def checkpoint_state_dict(self):
          return {**prefixed(self.student.state_dict(), "student."), **self.ema.state_dict("ema.")}
      with self.ema.swapped():            # sample with the averaged weights
          images = ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["EMA", "ema_update_"]


@torch.no_grad()
def ema_update_(
    target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float
) -> None:
    """``target <- decay * target + (1 - decay) * source``, in place, tensor by tensor.

    Non-floating tensors (e.g. integer buffers) are copied. Raises ``ValueError`` when the two
    iterables differ in length or shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    target, source = list(target), list(source)
    if len(target) != len(source):
        raise ValueError(
            f"EMA target has {len(target)} tensors but the source has {len(source)}; "
            "pass matching parameter lists (same module structure)"
        )
    floats_t, floats_s = [], []
    for t, s in zip(target, source):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch: target {tuple(t.shape)} vs source {tuple(s.shape)}")
        if _is_dtensor(t) != _is_dtensor(s):
            raise ValueError(
                f"EMA: the {'target' if _is_dtensor(t) else 'source'} is sharded (FSDP DTensor) and the other is not; "
                "an EMA copy must be sharded exactly like the network it follows (fastgen.trainers.engine.sharding "
                "shards a frozen copy shaped like a trained network alike)"
            )
        if t.is_floating_point():
            floats_t.append(t)
            floats_s.append(s.detach().to(device=t.device, dtype=t.dtype))
        else:
            t.copy_(s)
    if floats_t:
        # lerp_(end, weight): t + weight * (s - t) == decay * t + (1 - decay) * s
        torch._foreach_lerp_(floats_t, floats_s, 1.0 - decay)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


class EMA:
    """EMA shadow of ``module``'s floating-point parameters that require grad.

    Args:
        module: the trained module (its parameters are read at each :meth:`update`).
        decay: the EMA decay (``0.999`` keeps ~1000 steps of history).
        warmup: if true, the effective decay is ``min(decay, (1 + n) / (10 + n))`` at the
            n-th update, so that early averages are not dominated by the initial weights.
        update_after: updates before this count just copy the weights (no averaging).
        device: where to keep the shadow (default: next to each parameter).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        update_after: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = module
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_after = int(update_after)
        self.num_updates = 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]
        if not self.names:
            raise ValueError("EMA: the module has no trainable floating-point parameters to average")
        params = dict(module.named_parameters())
        self.shadow: dict[str, torch.Tensor] = {
            n: params[n].detach().clone().to(device if device is not None else params[n].device)
            for n in self.names
        }
        self._fixed_device = device is not None
        self._backup: dict[str, torch.Tensor] | None = None

    # ---- math ------------------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.num_updates < self.update_after:
            return 0.0
        if self.warmup:
            n = self.num_updates - self.update_after
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    def _params(self) -> list[torch.Tensor]:
        params = dict(self.module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise RuntimeError(f"EMA: parameters {missing[:3]} disappeared from the module")
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights into the average."""
        params = self._params()
        if not self._fixed_device:  # follow the module when it was moved (e.g. by the trainer)
            for (n, s), p in zip(list(self.shadow.items()), params):
                if s.device != p.device:
                    self.shadow[n] = s.to(p.device)
        ema_update_(list(self.shadow.values()), params, self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module | None = None) -> None:
        """Write the averaged weights into ``module`` (default: the tracked module)."""
        params = dict((module or self.module).named_parameters())
        for n, s in self.shadow.items():
            params[n].copy_(s.to(device=params[n].device, dtype=params[n].dtype))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into the module; the trained ones come back."""
        if self._backup is not None:
            raise RuntimeError("EMA.swapped() is not re-entrant")
        params = dict(self.module.named_parameters())
        self._backup = {n: params[n].detach().clone() for n in self.names}
        try:
            self.copy_to()
            yield self.module
        finally:
            with torch.no_grad():
                for n, b in self._backup.items():
                    params[n].copy_(b)
            self._backup = None

    @torch.no_grad()
    def shard_like_module(self) -> int:
        """After the tracked module was sharded with FSDP (``fastgen.trainers.engine.sharding``): make each
        shadow of a sharded parameter a DTensor with the parameter's mesh and placements (scattered from
        rank 0, so every rank starts from the same average). Returns how many shadows were converted;
        sharded shadows live on the parameters' device."""
        params = dict(self.module.named_parameters())
        converted = 0
        for n in self.names:
            p, s = params.get(n), self.shadow[n]
            if p is None or not _is_dtensor(p) or _is_dtensor(s):
                continue
            from torch.distributed.tensor import distribute_tensor

            self.shadow[n] = distribute_tensor(s.detach().to(device=p.device, dtype=s.dtype), p.device_mesh, p.placements)
            converted += 1
        if converted:
            self._fixed_device = False
        return converted

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-compatible): ``{prefix}shadow.<name>`` and ``{prefix}num_updates``."""
        out = {f"{prefix}shadow.{n}": t.detach() for n, t in self.shadow.items()}
        out[f"{prefix}num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Restore from :meth:`state_dict` output (extra keys outside ``prefix`` are ignored)."""
        missing = [n for n in self.names if f"{prefix}shadow.{n}" not in state]
        if missing or f"{prefix}num_updates" not in state:
            raise KeyError(
                f"EMA state is missing {len(missing)} shadow tensors (e.g. {missing[:2]}) or "
                f"'{prefix}num_updates'; was it saved from the same module with prefix '{prefix}'?"
            )
        for n in self.names:
            src = state[f"{prefix}shadow.{n}"]
            if src.shape != self.shadow[n].shape:
                raise ValueError(f"EMA shadow '{n}' has shape {tuple(src.shape)}, expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(src)
        self.num_updates = int(state[f"{prefix}num_updates"])

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self
