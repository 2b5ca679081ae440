"""Sampling latency of diffusers text-to-image pipelines.

:func:`measure_pipeline_speed` times a pipeline (``StableDiffusionPipeline``, ``FluxPipeline``, ...:
anything called as ``pipe(prompt, num_inference_steps=, guidance_scale=, generator=, output_type=,
height=, width=)`` whose denoiser is ``pipe.unet`` or ``pipe.transformer``) in two scopes:

``end_to_end``
    the whole call (text encoding, every denoiser step, VAE decode) with ``output_type="pt"``.
``network``
    only the denoiser forwards inside the same kind of call. Forward pre/post hooks on the denoiser
    time each forward (``torch.cuda.synchronize()`` around the clock on CUDA) and the per-call
    latency is the sum over the call's forwards. The hooks also count the forwards of a call
    (``network_evals``) and the batch each forward sees (``network_batch``): classifier-free guidance
    in Stable Diffusion doubles the batch of one forward, Flux' true CFG runs two forwards.
    The same calls are also timed whole, so the work outside the denoiser (text encoding, scheduler,
    VAE decode, pipeline overhead) is measured per call as the call's time minus its forwards
    (``outside_denoiser_s_*``): both from one call, it is never negative, unlike the difference of
    the two scopes' medians, which come from different calls and carry their noise.

LoRA: rows record the adapters' state (``lora``: ``"none"``, ``"fused"``, ``"unfused"`` or
``"partly fused"``; :func:`lora_state`). A LoRA student is deployed fused (:func:`fuse_lora`, i.e.
``pipe.fuse_lora()``); :func:`fastgen.evaluation.bench.measure_speed` times it that way as its main row
and the adapters as loaded as ``<label> (unfused)``.

Protocol: ``warmup`` untimed calls, then ``repeats`` timed calls per scope, each with the same prompt
and a fresh ``torch.Generator("cpu").manual_seed(seed)``. The end-to-end calls run without any hook
installed (the forward counters of the warm-up calls are removed before the first timed call), so the
hooks never touch end-to-end numbers. Per-call latency is taken with ``time.perf_counter`` between two
``torch.cuda.synchronize()`` on CUDA; rows give the median, the 90th percentile (numpy's linear
interpolation), the mean and every sample. In total a measurement makes
``warmup + repeats * len(scopes)`` pipeline calls.

Peak memory (``peak_mem_mb``, ``peak_mem_kind``): on CUDA ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats`` right before the scope's timed calls (``"cuda_max_allocated"``);
on other devices the process' resident set size sampled every ~5 ms by a background thread during the
timed calls (``"cpu_peak_rss"``), the absolute peak. ``peak_mem_delta_mb`` is the peak minus the value
right before the timed calls.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np
import torch

from fastgen.errors import ConfigError

#: The columns every speed table shows (rows carry more keys, see :func:`measure_pipeline_speed`).
SPEED_COLUMNS = [
    "pipeline",
    "steps",
    "guidance",
    "scope",
    "latency_s_median",
    "latency_s_p90",
    "images_per_s",
    "peak_mem_mb",
    "device",
]

#: Valid values of the ``scopes`` argument.
SCOPES = ("end_to_end", "network")

_MB = float(2**20)
_RSS_INTERVAL_S = 0.005


# --------------------------------------------------------------------------- pipeline inspection


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` or else ``pipe.transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    components = getattr(pipe, "components", None)
    if isinstance(components, dict) and components:
        found = ", ".join(f"{k}={type(v).__name__}" for k, v in components.items())
    else:
        found = ", ".join(
            f"{k}={type(v).__name__}" for k, v in vars(pipe).items() if isinstance(v, torch.nn.Module)
        ) or "no torch modules"
    raise ConfigError(
        f"{type(pipe).__name__} has no denoiser: expected a torch module in `pipe.unet` or "
        f"`pipe.transformer`, found {found}"
    )


def _device_of(pipe, denoiser: torch.nn.Module) -> torch.device:
    for p in denoiser.parameters():
        return p.device
    device = getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _dtype_of(denoiser: torch.nn.Module) -> str:
    dtype = getattr(denoiser, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((p.dtype for p in denoiser.parameters()), None)
    return "unknown" if dtype is None else str(dtype).replace("torch.", "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def _is_compiled(module: torch.nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        OptimizedModule = ()  # type: ignore[assignment]
    if OptimizedModule and isinstance(module, OptimizedModule):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None  # nn.Module.compile()


def _attention_backend(denoiser: torch.nn.Module) -> str:
    """Class name of the denoiser's first attention processor (plus the dispatcher backend when set)."""
    try:
        processors = denoiser.attn_processors
    except Exception:
        processors = None
    if not processors:
        return "unknown"
    first = next(iter(processors.values()))
    name = type(first).__name__
    backend = getattr(first, "_attention_backend", None)
    if backend is not None:
        name += f"[{getattr(backend, 'value', backend)}]"
    return name


def _versions() -> dict[str, str]:
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception:  # pragma: no cover
        diffusers_version = "unavailable"
    return {"torch": torch.__version__, "diffusers": diffusers_version}


# --------------------------------------------------------------------------- LoRA adapters


def lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers (``BaseTunerLayer``) inside ``module``; ``[]`` without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - peft not installed: no adapters can be loaded either
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _unfused(layer) -> bool:
    """An enabled adapter of ``layer`` whose weights are not merged into the base layer."""
    if getattr(layer, "disable_adapters", False):
        return False
    active = getattr(layer, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    merged = set(getattr(layer, "merged_adapters", None) or [])
    own = set(getattr(layer, "lora_A", {}) or {}) | set(getattr(layer, "lora_embedding_A", {}) or {})
    return any(a not in merged for a in active if not own or a in own)


def _pipeline_modules(pipe) -> list[torch.nn.Module]:
    components = getattr(pipe, "components", None)
    if isinstance(components, dict) and components:
        return [m for m in components.values() if isinstance(m, torch.nn.Module)]
    return [denoiser_of(pipe)]


def lora_state(pipe) -> dict[str, Any]:
    """``{"lora": "none" | "fused" | "unfused" | "partly fused", "lora_layers": n, "lora_unfused_layers": k}``
    over every torch module of the pipeline (denoiser and text encoders)."""
    layers = [layer for m in _pipeline_modules(pipe) for layer in lora_layers(m)]
    unfused = sum(_unfused(layer) for layer in layers)
    if not layers:
        state = "none"
    elif unfused == 0:
        state = "fused"
    elif unfused == len(layers):
        state = "unfused"
    else:
        state = "partly fused"
    return {"lora": state, "lora_layers": len(layers), "lora_unfused_layers": int(unfused)}


def fuse_lora(pipe) -> dict[str, Any]:
    """``pipe.fuse_lora()`` (the adapters merged into the base weights, as LoRA students are deployed),
    checked: returns :func:`lora_state`, which must report every LoRA layer fused."""
    if not callable(getattr(pipe, "fuse_lora", None)):
        raise ConfigError(f"{type(pipe).__name__} has no fuse_lora(); load LoRA weights with a diffusers pipeline")
    pipe.fuse_lora()
    state = lora_state(pipe)
    if state["lora_unfused_layers"]:
        raise ConfigError(f"pipe.fuse_lora() left {state['lora_unfused_layers']} of {state['lora_layers']} LoRA layers "
                          f"unfused; the fused timing would not be what a deployment runs")
    return state


# --------------------------------------------------------------------------- clocks and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_reader():
    """A function returning the process' current resident set size in bytes."""
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        return lambda: proc.memory_info().rss
    except Exception:
        pass
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def from_proc() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    try:
        from_proc()
        return from_proc
    except Exception:  # no /proc: the high-water mark is the best there is
        import resource

        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...); ``None`` without ``/proc``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current resident set, by writing
    ``5`` to ``/proc/self/clear_refs``. ``False`` where that is not possible (no ``/proc``, not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return proc_status_kb("VmHWM") is not None


class _RssSampler:
    """The peak resident set size over a block: the kernel's high-water mark where it can be reset
    (Linux), which no allocation escapes however short, together with the maximum of samples taken every
    ``interval`` seconds in a daemon thread (all there is elsewhere)."""

    def __init__(self, interval: float = _RSS_INTERVAL_S) -> None:
        self.interval = interval
        self.read = _rss_reader()
        self.baseline = self.peak = self.read()
        self.hwm = reset_peak_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastgen-rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        if self.hwm:
            self.peak = max(self.peak, (proc_status_kb("VmHWM") or 0) * 1024)


class _MemoryPeak:
    """Peak memory over a block: CUDA allocator peak on CUDA, sampled process RSS elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.peak_mb = self.baseline_mb = 0.0
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> "_MemoryPeak":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / _MB
        else:
            self._sampler = _RssSampler().__enter__()
            self.baseline_mb = self._sampler.baseline / _MB
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / _MB
        else:
            assert self._sampler is not None
            self._sampler.__exit__(*exc)
            self.peak_mb = self._sampler.peak / _MB


# --------------------------------------------------------------------------- denoiser hooks


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    """Batch size of a denoiser forward: its sample (positional, ``sample`` or ``hidden_states``)."""
    candidates: list[Any] = []
    if args:
        candidates.append(args[0])
    candidates += [kwargs.get("sample"), kwargs.get("hidden_states")]
    candidates += list(args[1:]) + list(kwargs.values())
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class _DenoiserProbe:
    """Forward pre/post hooks on the denoiser that count its forwards, note their batch sizes and,
    with ``timed``, sum their wall time (synchronising CUDA around the clock)."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device, timed: bool) -> None:
        self.denoiser = denoiser
        self.device = device
        self.timed = timed
        self.calls: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._starts: list[float] = []

    # one record per pipeline call
    def new_call(self) -> None:
        self.calls.append({"evals": 0, "batches": [], "seconds": 0.0})

    def _pre(self, module, args, kwargs):
        if not self.calls:
            self.new_call()
        record = self.calls[-1]
        record["evals"] += 1
        record["batches"].append(_batch_of(args, kwargs))
        if self.timed:
            _sync(self.device)
            self._starts.append(time.perf_counter())
        return None

    def _post(self, module, args, output):
        if self.timed and self._starts:
            _sync(self.device)
            self.calls[-1]["seconds"] += time.perf_counter() - self._starts.pop()
        return None

    def __enter__(self) -> "_DenoiserProbe":
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.denoiser.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._starts = []

    def evals_and_batch(self) -> tuple[Any, Any]:
        if not self.calls:
            return None, None
        evals = [c["evals"] for c in self.calls]
        network_evals: Any = evals[0] if len(set(evals)) == 1 else float(statistics.mean(evals))
        batches = [b for c in self.calls for b in c["batches"] if b is not None]
        if not batches:
            return network_evals, None
        # the batch most forwards see (all of them in SD and Flux pipelines)
        network_batch = Counter(batches).most_common(1)[0][0]
        return network_evals, network_batch


# --------------------------------------------------------------------------- measurement


def _validate(steps: int, batch_size: int, warmup: int, repeats: int, scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        scopes = (scopes,)
    scopes = tuple(scopes)
    if not scopes:
        raise ConfigError(f"scopes is empty; choose one or more of {list(SCOPES)}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ConfigError(f"unknown speed scope(s) {bad}; valid scopes are {list(SCOPES)}")
    if len(set(scopes)) != len(scopes):
        raise ConfigError(f"scopes {list(scopes)} list a scope twice; give each of {list(SCOPES)} at most once")
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1 (the timed calls per scope), got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0 (untimed calls before timing), got {warmup!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return scopes


class _QuietProgressBar:
    """Disables the pipeline's tqdm bar while measuring and restores the previous setting afterwards."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.had = hasattr(pipe, "_progress_bar_config")
        self.previous = dict(getattr(pipe, "_progress_bar_config", {}) or {})

    def __enter__(self):
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        return self

    def __exit__(self, *exc) -> None:
        if not hasattr(self.pipe, "set_progress_bar_config"):
            return
        if self.had:
            self.pipe._progress_bar_config = self.previous
        else:
            try:
                del self.pipe._progress_bar_config
            except AttributeError:
                pass


def _summary(latencies: list[float]) -> dict[str, Any]:
    arr = np.asarray(latencies, dtype=np.float64)
    return {
        "latency_s_median": float(np.median(arr)),
        "latency_s_p90": float(np.percentile(arr, 90, method="linear")),
        "latency_s_mean": float(arr.mean()),
        "latency_s_all": [float(x) for x in arr],
    }


def measure_pipeline_speed(
    pipe,
    *,
    label: str,
    prompt: str,
    steps: int,
    guidance: float,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    scopes=("end_to_end", "network"),
    compile_mode: str = "none",
    call_kwargs: dict | None = None,
) -> list[dict]:
    """Time ``pipe`` and return one row per scope (in the order of ``scopes``).

    Each row has the keys of :data:`SPEED_COLUMNS` plus ``latency_s_mean``, ``latency_s_all``,
    ``peak_mem_kind``, ``peak_mem_delta_mb``, ``batch_size``, ``height``, ``width``, ``resolution``
    (``"HxW"``; height and width are read from the output images when not given),
    ``network_evals`` (denoiser forwards per call), ``network_batch`` (batch of one forward),
    ``warmup``, ``repeats``, ``dtype`` (of the denoiser), ``attention_backend``, ``compile_mode``,
    ``lora`` / ``lora_layers`` / ``lora_unfused_layers`` (:func:`lora_state`), ``torch`` and ``diffusers``.
    The ``network`` row also has ``call_s_median`` (the hooked calls' whole time) and
    ``outside_denoiser_s_median`` / ``_p90`` / ``_all``: per call, its whole time minus its forwards
    (>= 0 by construction).

    ``batch_size`` images come from ``batch_size`` copies of ``prompt``. ``call_kwargs`` are passed to
    every call and override the defaults (e.g. ``true_cfg_scale`` + ``negative_prompt`` for Flux,
    ``max_sequence_length``). ``compile_mode`` is recorded as given; a denoiser wrapped by
    ``torch.compile`` without a mode given is recorded as ``"torch.compile"``.
    """
    scopes = _validate(steps, batch_size, warmup, repeats, scopes)
    denoiser = denoiser_of(pipe)
    device = _device_of(pipe, denoiser)
    if compile_mode in (None, "", "none") and _is_compiled(denoiser):
        compile_mode = "torch.compile"
    compile_mode = compile_mode or "none"

    kwargs: dict[str, Any] = {
        "prompt": [prompt] * batch_size,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_type": "pt",
    }
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    kwargs.update(call_kwargs or {})

    seen_hw: list[tuple[int, int]] = []

    def call() -> None:
        out = pipe(**kwargs, generator=torch.Generator(device="cpu").manual_seed(seed))
        images = getattr(out, "images", None)
        if not seen_hw and isinstance(images, torch.Tensor) and images.dim() == 4:
            seen_hw.append((int(images.shape[-2]), int(images.shape[-1])))
        del out, images

    env = {
        **lora_state(pipe),
        "device": _device_name(device),
        "dtype": _dtype_of(denoiser),
        "attention_backend": _attention_backend(denoiser),
        "compile_mode": compile_mode,
        **_versions(),
    }

    rows: list[dict] = []
    with _QuietProgressBar(pipe):
        # warm-up: untimed; forward counters only (removed before any timed call)
        warm_probe = _DenoiserProbe(denoiser, device, timed=False)
        with warm_probe:
            for _ in range(warmup):
                warm_probe.new_call()
                call()
        _sync(device)

        measured: dict[str, dict[str, Any]] = {}
        network_probe: _DenoiserProbe | None = None
        for scope in scopes:
            latencies: list[float] = []
            extra: dict[str, Any] = {}
            if scope == "end_to_end":
                with _MemoryPeak(device) as mem:
                    for _ in range(repeats):
                        _sync(device)
                        t0 = time.perf_counter()
                        call()
                        _sync(device)
                        latencies.append(time.perf_counter() - t0)
            else:
                network_probe = _DenoiserProbe(denoiser, device, timed=True)
                whole: list[float] = []
                with _MemoryPeak(device) as mem, network_probe:
                    for _ in range(repeats):
                        network_probe.new_call()
                        _sync(device)
                        t0 = time.perf_counter()
                        call()
                        _sync(device)
                        whole.append(time.perf_counter() - t0)
                latencies = [c["seconds"] for c in network_probe.calls]
                # the forwards are sub-intervals of their call: the rest is the work outside the denoiser
                outside = [max(0.0, w - n) for w, n in zip(whole, latencies)]
                o = _summary(outside)
                extra = {"call_s_median": float(np.median(whole)), "outside_denoiser_s_median": o["latency_s_median"],
                         "outside_denoiser_s_p90": o["latency_s_p90"], "outside_denoiser_s_all": o["latency_s_all"]}
            measured[scope] = {**_summary(latencies), "mem": mem, "extra": extra}

    # forward counts: from the hooked timed calls when measured, else from the warm-up calls
    probe = network_probe if network_probe is not None else warm_probe
    network_evals, network_batch = probe.evals_and_batch()

    # the resolution the pipeline produced when the caller left it to the pipeline's default
    if seen_hw:
        height = height if height is not None else seen_hw[0][0]
        width = width if width is not None else seen_hw[0][1]
    resolution = f"{height}x{width}" if height is not None and width is not None else None

    for scope in scopes:
        m = measured[scope]
        mem = m.pop("mem")
        extra = m.pop("extra")
        median = m["latency_s_median"]
        rows.append(
            {
                "pipeline": label,
                "steps": steps,
                "guidance": float(guidance),
                "scope": scope,
                "latency_s_median": median,
                "latency_s_p90": m["latency_s_p90"],
                "images_per_s": (batch_size / median) if median > 0 else float("inf"),
                "peak_mem_mb": float(mem.peak_mb),
                "device": env["device"],
                "latency_s_mean": m["latency_s_mean"],
                "latency_s_all": m["latency_s_all"],
                "peak_mem_kind": mem.kind,
                "peak_mem_delta_mb": float(mem.peak_mb - mem.baseline_mb),
                "batch_size": batch_size,
                "height": height,
                "width": width,
                "resolution": resolution,
                "network_evals": network_evals,
                "network_batch": network_batch,
                "warmup": warmup,
                "repeats": repeats,
                "dtype": env["dtype"],
                "attention_backend": env["attention_backend"],
                "compile_mode": compile_mode,
                "lora": env["lora"],
                "lora_layers": env["lora_layers"],
                "lora_unfused_layers": env["lora_unfused_layers"],
                "torch": env["torch"],
                "diffusers": env["diffusers"],
                **extra,
            }
        )
    return rows


def speed_ratio(rows, numerator: tuple[str, int], denominator: tuple[str, int], scope="end_to_end") -> float:
    """Median latency of the ``(label, steps)`` row ``numerator`` divided by that of ``denominator``
    (both in ``scope``); e.g. ``speed_ratio(rows, ("teacher", 50), ("student", 4))`` is the speed-up."""

    def find(key: tuple[str, int]) -> float:
        label, steps = key
        hits = [r for r in rows if r.get("pipeline") == label and r.get("steps") == steps and r.get("scope") == scope]
        if not hits:
            have = sorted({(r.get("pipeline"), r.get("steps"), r.get("scope")) for r in rows}, key=str)
            raise ConfigError(f"no speed row for pipeline={label!r}, steps={steps}, scope={scope!r}; rows have {have}")
        if len(hits) > 1:
            raise ConfigError(
                f"{len(hits)} speed rows match pipeline={label!r}, steps={steps}, scope={scope!r}; "
                "give the configurations distinct labels"
            )
        value = hits[0].get("latency_s_median")
        if not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"speed row pipeline={label!r}, steps={steps}, scope={scope!r} has no latency ({value!r})")
        return float(value)

    num, den = find(tuple(numerator)), find(tuple(denominator))
    if den <= 0:
        raise ConfigError(f"denominator latency of {denominator} is {den}; cannot form a ratio")
    return num / den
