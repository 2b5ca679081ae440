"""Speed options of the training step, applied to the networks a method's step runs.

``train.channels_last``
    every 4-D convolution network of :meth:`~fastgen.trainers.method.Method.step_networks` in the
    channels-last memory format (NHWC kernels: usually faster for convolutions in bf16/fp16 on GPUs;
    ``benchmarks/train_throughput.py`` measures it per device and size).
``train.compile``
    ``torch.compile`` (inductor, ``dynamic=False``) of each step network in place
    (``nn.Module.compile``: parameters, hooks and ``state_dict`` keys stay the module's own, so
    checkpoints, EMA updates and exports are unchanged). Networks the method declares constant
    (:meth:`~fastgen.trainers.method.Method.constant_networks`, the frozen teacher) are compiled with
    inductor's ``freezing``, which folds their weights into the code of no-grad calls (weight
    pre-packing on CPU). Sample grids and evaluations run the same modules eagerly
    (:func:`eager`), so a new sampling batch shape never triggers a compilation.

Both keep the maths of the step (tested against the eager, contiguous step); the graph and graph-break
counts of a run are in :func:`compile_counters`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["apply_channels_last", "compile_counters", "compile_step_networks", "eager", "COMPILE_MODES"]

#: ``train.compile_mode`` values (torch.compile modes)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _has_conv2d(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def apply_channels_last(method: Any) -> list[str]:
    """Put every step network with 2-D convolutions in channels-last; returns their names."""
    done = []
    for name, module in method.step_networks().items():
        if _has_conv2d(module):
            module.to(memory_format=torch.channels_last)
            done.append(name)
    return done


def compile_step_networks(method: Any, mode: str = "default", freeze_constant: bool = True,
                          backend: str = "inductor") -> dict[str, str]:
    """``nn.Module.compile`` every step network of ``method`` in place; returns ``{name: how}``.

    ``how`` is the backend, ``+freezing`` for a constant network compiled by inductor (``freeze_constant``).
    ``backend`` ``eager`` / ``aot_eager`` traces without generating code (a quick graph-break check)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    constant = set(method.constant_networks()) if (freeze_constant and backend == "inductor") else set()
    done: dict[str, str] = {}
    for name, module in method.step_networks().items():
        kwargs: dict[str, Any] = {"dynamic": False}
        if name in constant:
            kwargs["options"] = {"freezing": True}  # torch.compile takes either a mode or options
        elif mode != "default":
            kwargs["mode"] = mode
        module.compile(backend=backend, **kwargs)
        done[name] = backend + ("+freezing" if name in constant else "")
    return done


@contextlib.contextmanager
def eager(enabled: bool = True) -> Iterator[None]:
    """Run compiled modules eagerly inside this block (sampling and evaluation of a compiled run)."""
    if not enabled:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def compile_counters() -> dict[str, int]:
    """Graphs compiled and graph breaks so far in this process (``torch._dynamo`` counters). A recompilation
    shows as a graph more than the networks called: compare ``graphs`` after later steps with the first."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return {}
    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
