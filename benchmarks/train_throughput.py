"""Training throughput of the LCD step: samples/s and peak memory, full and LoRA mode.

Usage::

    # the ladder (default): the reference step against the optimised one, one change at a time
    python benchmarks/train_throughput.py [--quick] [--out benchmarks/results] [--device cpu|cuda] [--rungs ...]
    # the shipped step's batched / separate / cached variants (train_throughput_variants.*)
    python benchmarks/train_throughput.py --study variants [--repeats N] ...

``--study ladder`` (:data:`LADDER`): per teacher x mode, one worker process measures the reference step of
diffusers' example LCD scripts (uncached VAE and text encoding of every batch, the teacher's uncond and
cond passes as two forwards, every network in float32, torch's default AdamW), then adds one change at a
time (latent cache, batched CFG, fused AdamW, bf16 teacher, channels-last, torch.compile, gradient
checkpointing; bf16 autocast on GPUs) to the best configuration so far, keeping it where it holds
(:func:`keep_rung`). Each rung is a fresh LCD object built in the same process after the previous one is
freed; its peak memory is its weights (the bytes of its parameters and buffers), what its priming step left
allocated (optimizer state, compiled graphs with their folded constants) and its step's peak. Defaults: the
digits teacher at batch 32 and the SD1.5 architecture at 32x32 latents (256 px), batch 2. Writes
``<out>/train_throughput.{json,md,png}``.

The rest of this docstring describes ``--study variants``:

    # the GPU step of benchmarks/gpu/run.sh: the SD1.5 architecture at 512 px, bf16, batched vs separate
    # CFG, eager then torch.compile, inside a time budget
    python benchmarks/train_throughput.py --device cuda --teachers sd15-arch --modes full --sd15-latent 64 \
        --sd15-batch 8 --teacher-dtype bfloat16 --autocast bf16 --variants batched,separate --compile both \
        --budget-s 150 --out DIR
    # its CPU smoke path (the reduced-width stand-in; aot_eager traces forward and backward, no codegen)
    python benchmarks/train_throughput.py --tiny --device cpu --teachers sd15-arch --modes full --sd15-latent 8 \
        --sd15-batch 1 --teacher-dtype bfloat16 --autocast bf16 --variants batched,separate --compile both \
        --compile-backend aot_eager --out DIR

Writes ``<out>/train_throughput.json`` (``protocol`` + ``rows`` + ``comparisons`` + ``skipped``) and
``<out>/train_throughput.md``, both atomically.

Configurations: teacher x mode x variant.

* teachers: ``digits`` (the shipped ``sd-digits`` teacher, 32 px) and ``sd15-arch``: a
  ``StableDiffusionPipeline`` built once in a temp folder from configs alone (random weights)
  whose UNet has the real SD1.5 config (block_out_channels 320/640/1280/1280, 3 x
  CrossAttnDownBlock2D + DownBlock2D, UpBlock2D + 3 x CrossAttnUpBlock2D, layers_per_block 2,
  cross_attention_dim 768, attention_head_dim 8; 859.5M parameters) at ``sample_size`` 16,
  the SD1.5 VAE architecture (factor 8, so 16x16 latents = 128 px), a CLIP-L-shaped text encoder
  (hidden 768, 12 layers) over the shipped digits tokenizer, and the digits DDIM scheduler (the
  SD1.5 betas); ``--sd15-latent 64`` makes it 512 px. ``--quick`` and ``--tiny`` replace it with
  ``sd15-arch-mini``: the same block structure at widths 32/64/64/64 with a 1-layer text encoder
  and a narrow VAE.
* modes: ``full`` (student + EMA target) and ``lora`` (peft adapters on the teacher UNet).
* variants, run one after the other on the same LCD object:
  - ``batched``: the shipped step; ``Teacher.predict`` runs uncond and cond as ONE forward of
    batch 2B.
  - ``separate``: the baseline without batched CFG. :func:`separate_cond_uncond` sets the teacher's
    ``cfg_forward`` to ``separate`` (``teacher.cfg_forward`` in a recipe): ``Teacher.predict`` calls
    the network twice, uncond (batch B) then cond (batch B), with the same guidance combination
    ``u + w (c - u)`` and x0/eps conversion.
  - ``cached``: the ``use_latent_cache`` path: the step's images and captions are first encoded
    by ``LCD.build_cache`` into an ``EmbeddingCache`` (VAE latents + text hidden states) and
    the batches come from that cache, so the step runs no VAE encode and no text encoder (the
    rows count both per step to show it). The one-off encoding time is ``cache_build_s``.

Sections (``--compile``): ``eager``, then (``both``) ``compiled``: the same LCD object after
``nn.Module.compile(backend, mode, dynamic=False)`` of the teacher UNet, the student and the EMA
target (:func:`compile_networks`; rows say ``compile: <backend>/<mode>``, ``none`` when eager).
``--autocast bf16`` runs the step's forward under ``torch.autocast`` as ``train.mixed_precision: bf16``
does (float32 student and AdamW state; ``--teacher-dtype bfloat16`` stores the frozen teacher in bf16).

Per section and variant, ``--prime`` unmeasured steps run first (first-use allocations and, under
``torch.compile``, the compilation of the variant's shapes then land in no measured number;
``prime_s`` records them). Then ``warmup`` steps, then ``repeats`` timed steps; one step = ``zero_grad`` +
``LCD.train_step`` + ``backward`` + ``AdamW.step`` (plain AdamW over ``parameter_groups()``) +
``after_optimizer_step`` (the EMA update in full mode), timed with ``time.perf_counter``
(``torch.cuda.synchronize`` around it on GPU). ``sec_per_step_median`` is the median over the
timed steps and ``samples_per_s = batch / median``. Batches are built before timing (pixels +
captions, or cached latents + hidden states) and cycle over a small pool. Forward calls are counted
by hooks in the eager section only (a hook added after compilation is invisible to compiled code).

``--budget-s``: no build, section or variant starts once it is spent; a worker still running
``DEADLINE_GRACE_S`` later is stopped and the variants it finished are kept (its partial result is
rewritten after every variant); the JSON and markdown are rewritten after every teacher x mode.

Memory (``peak_mem_mb``): the peak over the variant's warm-up and timed steps minus the memory
right before them (so activations, gradients, AdamW state and temporaries; weights that exist
before the first step are in ``mem_baseline_mb``; ``peak_mem_total_mb`` is the absolute peak).
CPU: the kernel's resident-set high-water mark ``VmHWM`` of ``/proc/self/status``, reset with
``/proc/self/clear_refs`` (``5``) after ``gc.collect()`` and ``malloc_trim(0)`` before each variant;
without ``/proc`` it falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be
reset (then only the first variant of a process is a clean number; ``mem_method`` says which was
used). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Each teacher x mode runs in its own Python subprocess (a clean heap for the memory numbers, and a
config that runs out of memory is recorded as failed instead of ending the run); the variants of
one teacher x mode run in the same process, so their ratios (``speedup_vs_batched``,
``comparisons``) come from the same process, side by side. Before starting a process the
benchmark estimates its memory need from the weight files; a full-mode config whose float32
estimate does not fit the available memory runs with a bfloat16 teacher UNet
(``--teacher-dtype auto``, the default; the row says which dtype ran), and one that does not fit
at all is listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastgen.evaluation.speed import malloc_trim, proc_status_kb, reset_peak_rss  # noqa: E402
from fastgen.models.architectures import CLIP_L_TEXT, SD15_UNET, SD15_VAE  # noqa: E402

RESULT_NAME = "train_throughput"
#: results of ``--study variants`` (the shipped step's batched / separate / cached variants)
VARIANTS_RESULT_NAME = "train_throughput_variants"
VARIANTS = ("batched", "separate", "cached")
MODES = ("full", "lora")
TEACHERS = ("digits", "sd15-arch")
#: ``--autocast``: the step's forward under ``torch.autocast`` in this dtype (``train.mixed_precision``).
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: ``--compile``: which sections run: eager only, eager then compiled (same process), compiled only.
COMPILE_CHOICES = ("none", "both", "only")
#: A config runs (in float32) only when its memory estimate is below this share of the available memory.
MEMORY_HEADROOM = 0.95
ROW_KEYS = ("teacher", "mode", "variant", "batch", "sec_per_step_median", "samples_per_s", "peak_mem_mb", "device")
MD_COLUMNS = [
    "teacher",
    "mode",
    "variant",
    "compile",
    "batch",
    "resolution",
    "teacher_dtype",
    "autocast",
    "sec_per_step_median",
    "samples_per_s",
    "speedup_vs_batched",
    "peak_mem_mb",
    "peak_mem_total_mb",
    "prime_s",
    "teacher_unet_calls_per_step",
    "vae_encoder_calls_per_step",
    "text_encoder_calls_per_step",
    "device",
]

#: CLIP ViT-L/14 text tower shape (SD1.5's text encoder), over the digits tokenizer's vocabulary.
SD15_TEXT = {k: CLIP_L_TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}

#: ``--quick`` stand-in: same block structure and cross-attention dim, narrow widths.
MINI_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64))
MINI_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
MINI_TEXT = {"hidden_size": 768, "intermediate_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12}


def sd15_unet_config(sample_size: int = 16, mini: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``UNet2DConditionModel`` for the SD1.5-architecture teacher (or the mini stand-in)."""
    return dict(MINI_UNET if mini else SD15_UNET, sample_size=int(sample_size))


# =========================================================================== the measured pieces


@contextlib.contextmanager
def separate_cond_uncond(teacher):
    """Inside this block the teacher runs classifier-free guidance as two forwards (uncond, then cond; its
    ``cfg_forward = "separate"``, the no-batching baseline); the teacher's own setting is restored on exit."""
    before = teacher.cfg_forward
    teacher.cfg_forward = "separate"
    try:
        yield teacher
    finally:
        teacher.cfg_forward = before


class CallCounter:
    """Forward hooks counting, per step, the teacher-role calls of the teacher's UNet (with their batch
    sizes), all calls of that UNet module, VAE-encoder calls and text-encoder calls.

    In LoRA mode the teacher's UNet is also the student and the target; a call is a teacher call when
    the adapters are disabled (``ConsistencyStudent.adapters_disabled``), which is how the LCD loss runs the teacher."""

    def __init__(self, method) -> None:
        teacher = method.teacher
        tuners = list(method.nets.lora.layers) if method.nets.is_lora else []
        self.steps: list[dict[str, Any]] = []
        self._cur: dict[str, Any] = self._empty()

        def on_unet(module, args, output):
            self._cur["unet_calls"] += 1
            if not tuners or tuners[0].disable_adapters:
                self._cur["teacher_rows"].append(int(args[0].shape[0]))

        def on_vae(module, args, output):
            self._cur["vae"] += 1

        def on_text(module, args, output):
            self._cur["text"] += 1

        self._handles = [teacher.net.register_forward_hook(on_unet), teacher.vae.encoder.register_forward_hook(on_vae)]
        self._handles += [enc.register_forward_hook(on_text) for enc in teacher.text_encoders]

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"unet_calls": 0, "teacher_rows": [], "vae": 0, "text": 0}

    def next_step(self) -> None:
        self.steps.append(self._cur)
        self._cur = self._empty()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self) -> dict[str, Any]:
        """Per-step counts (they must be the same every step; ``calls_consistent`` says whether they were)."""
        if not self.steps:
            return {}
        first = self.steps[0]
        same = all(
            (s["unet_calls"], s["teacher_rows"], s["vae"], s["text"])
            == (first["unet_calls"], first["teacher_rows"], first["vae"], first["text"])
            for s in self.steps
        )
        return {
            "teacher_unet_calls_per_step": len(first["teacher_rows"]),
            "teacher_unet_rows_per_call": list(first["teacher_rows"]),
            "unet_module_calls_per_step": first["unet_calls"],
            "vae_encoder_calls_per_step": first["vae"],
            "text_encoder_calls_per_step": first["text"],
            "calls_consistent": same,
        }


class MemoryWindow:
    """Peak memory over a window: ``start()`` before the steps, ``stop()`` after (see the module docstring)."""

    def __init__(self, device) -> None:
        self.device = device
        self.method = ""
        self.base_mb = 0.0

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
            return
        malloc_trim()
        if reset_peak_rss():
            self.method = "VmHWM (/proc/self/status) reset via /proc/self/clear_refs=5; baseline VmRSS"
            self.base_mb = (proc_status_kb("VmRSS") or 0) / 1024
        else:
            self.method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (not resettable); baseline psutil rss"
            try:
                import psutil

                self.base_mb = psutil.Process().memory_info().rss / 2**20
            except ImportError:
                self.method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (not resettable); baseline ru_maxrss"
                self.base_mb = _ru_maxrss_mb()

    def stop(self) -> tuple[float, float]:
        """``(peak - baseline, peak)`` in MiB."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            peak = (proc_status_kb("VmHWM") or 0) / 1024
        else:
            peak = _ru_maxrss_mb()
        return max(peak - self.base_mb, 0.0), peak


def _ru_maxrss_mb() -> float:
    import resource

    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 2**20 if sys.platform == "darwin" else v / 1024


def autocast_context(device, autocast: str | None):
    """``torch.autocast`` as the trainer's ``train.mixed_precision`` runs it (accelerate wraps the
    forward, i.e. ``train_step``, in it; backward and the optimizer step run outside), or a null context."""
    import torch

    if autocast in (None, "", "none", "no"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, AUTOCAST_DTYPES[autocast]))


def train_iteration(method, optimizer, batch: dict[str, Any], step: int, autocast: str | None = None) -> float:
    """One optimisation step as the trainer runs it (without accelerate): returns the loss.

    ``autocast`` (``bf16`` / ``fp16`` / ``None``): the forward under ``torch.autocast`` in that dtype, as
    ``train.mixed_precision`` does (the student's weights and AdamW state stay float32)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(method.teacher.device, autocast):
        out = method.train_step(batch, step)
    loss = out.losses["student"]
    loss.backward()
    optimizer.step()
    method.after_optimizer_step("student", step)
    return float(loss.detach())


def make_optimizer(method, lr: float = 1e-5):
    """Plain AdamW (the trainer's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) over the method's groups."""
    import torch

    groups = [{"params": list(ps), "name": n} for n, ps in method.parameter_groups().items()]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def prime_variants(method, variants, batches_for, steps: int = 1, autocast: str | None = None) -> dict[str, float]:
    """Unmeasured steps of every variant before any measurement, so one-off first-use allocations (kernel
    and primitive caches, lazy buffers, allocator growth) and, under ``torch.compile``, the compilation of
    each variant's shapes do not land in a measured variant. Returns the seconds each variant's priming took."""
    times: dict[str, float] = {}
    if steps <= 0:
        return times
    optimizer = make_optimizer(method)
    device = method.teacher.device
    for variant in variants:
        ctx = separate_cond_uncond(method.teacher) if variant == "separate" else contextlib.nullcontext()
        batches = batches_for(variant)
        _sync(device)
        t0 = time.perf_counter()
        with ctx:
            for i in range(steps):
                train_iteration(method, optimizer, batches[i % len(batches)], i, autocast)
        _sync(device)
        times[variant] = round(time.perf_counter() - t0, 3)
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    gc.collect()
    return times


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_counts() -> dict[str, Any]:
    """Graphs compiled and graph breaks so far in this process (``torch._dynamo`` counters), if readable."""
    try:
        from torch._dynamo.utils import counters

        return {"dynamo_unique_graphs": int(counters["stats"]["unique_graphs"]),
                "dynamo_graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # counters are internal; their layout may change
        return {}


def compile_networks(method, backend: str = "inductor", mode: str | None = None) -> list[str]:
    """``nn.Module.compile`` (in place: hooks, ``state_dict`` and parameters stay the module's own) of every
    UNet of the step: the teacher's, the student and the EMA target (full mode; in LoRA mode the teacher's
    UNet is also the student). ``dynamic=False``: each batch shape gets its own graph, compiled while the
    variants are primed. Returns the names of the compiled modules."""
    nets = method.nets
    modules = {"teacher.net": method.teacher.net}
    if nets.student is not method.teacher.net:
        modules["student"] = nets.student
    if nets.target is not None:
        modules["target"] = nets.target
    for module in modules.values():
        module.compile(backend=backend, mode=None if mode in (None, "", "default") else mode, dynamic=False)
    return list(modules)


def measure_variant(
    method,
    variant: str,
    batches: list[dict[str, Any]],
    warmup: int,
    repeats: int,
    seed: int = 0,
    autocast: str | None = None,
    count_calls: bool = True,
) -> dict[str, Any]:
    """Warm-up + timed steps of one variant on ``method``; returns the measured fields of a row.

    ``count_calls=False`` leaves the forward hooks of :class:`CallCounter` out (under ``torch.compile`` a
    hook added after compilation is not seen by the compiled code, so its counts would be wrong)."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    device = method.teacher.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    optimizer = make_optimizer(method)
    mem = MemoryWindow(device)
    ctx = separate_cond_uncond(method.teacher) if variant == "separate" else contextlib.nullcontext()
    times: list[float] = []
    losses: list[float] = []
    step = 0
    mem.start()
    with ctx:
        counter = CallCounter(method) if count_calls else None
        try:
            for _ in range(max(warmup, 1)):  # at least one counted step
                losses.append(train_iteration(method, optimizer, batches[step % len(batches)], step, autocast))
                if counter is not None:
                    counter.next_step()
                step += 1
        finally:
            if counter is not None:
                counter.close()
        for _ in range(repeats):
            batch = batches[step % len(batches)]
            sync()
            t0 = time.perf_counter()
            losses.append(train_iteration(method, optimizer, batch, step, autocast))
            sync()
            times.append(time.perf_counter() - t0)
            step += 1
    delta_mb, peak_mb = mem.stop()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    gc.collect()
    median = statistics.median(times)
    b = len(batches[0]["caption"])
    row = {
        "variant": variant,
        "batch": b,
        "warmup": max(warmup, 1),
        "repeats": repeats,
        "sec_per_step_median": median,
        "sec_per_step_min": min(times),
        "sec_per_step_max": max(times),
        "sec_per_step_all": [round(t, 6) for t in times],
        "samples_per_s": b / median,
        "peak_mem_mb": round(delta_mb, 2),
        "peak_mem_total_mb": round(peak_mb, 2),
        "mem_baseline_mb": round(mem.base_mb, 2),
        "mem_method": mem.method,
        "loss_last": losses[-1],
    }
    if counter is not None:
        row.update(counter.summary())
    return row


# =========================================================================== teachers


def build_sd15_pipeline(folder: str | os.PathLike, sample_size: int = 16, mini: bool = False, seed: int = 0) -> Path:
    """Save a random-weight ``StableDiffusionPipeline`` with the SD1.5 UNet/VAE/text-encoder architecture
    (or the ``mini`` stand-in) into ``folder``; tokenizer and scheduler come from the shipped digits teacher."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastgen.zoo.paths import resolve_model

    digits = resolve_model("digits-sd")
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(os.fspath(digits / "tokenizer"))
    base = CLIPTextConfig.from_pretrained(os.fspath(digits / "text_encoder"))
    text_cfg = CLIPTextConfig(
        vocab_size=max(int(base.vocab_size), len(tokenizer)),
        max_position_embeddings=int(tokenizer.model_max_length),
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        **(MINI_TEXT if mini else SD15_TEXT),
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = UNet2DConditionModel(**sd15_unet_config(sample_size, mini))
    vae = AutoencoderKL(**dict(MINI_VAE if mini else SD15_VAE, sample_size=int(sample_size) * 8))
    scheduler = DDIMScheduler.from_pretrained(os.fspath(digits / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return folder


def _weights_bytes(folder: Path) -> dict[str, int]:
    out = {}
    for sub in ("unet", "text_encoder", "vae"):
        out[sub] = sum(p.stat().st_size for p in (folder / sub).glob("*.safetensors"))
    return out


def estimate_memory_bytes(folder: Path, mode: str, teacher_dtype: str) -> int:
    """Rough peak need of one teacher x mode process (CPU RSS or GPU allocation), from the weight files.

    full: teacher UNet + student + EMA target + gradients + AdamW m and v (5 float32 UNet copies besides
    the teacher); lora: one UNet plus adapters/optimizer/activations allowance. Plus the encoders, an
    activation allowance of 15% of the UNet and 0.8 GB of runtime."""
    w = _weights_bytes(folder)
    u = w["unet"]
    teacher = 0.5 if teacher_dtype in ("bfloat16", "float16") else 1.0
    copies = teacher + 5.0 if mode == "full" else teacher + 0.35
    return int(u * copies + w["text_encoder"] + w["vae"] + 0.15 * u + 0.8e9)


def _available_bytes(device: str) -> int | None:
    if device == "cuda":  # nvidia-smi, so that this process never holds a CUDA context of its own
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            return int(float(out.strip().splitlines()[0]) * 2**20)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None


# =========================================================================== worker (one teacher x mode)


def _collate_pixels(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"pixels": torch.stack([it["pixels"] for it in items]), "caption": [it["caption"] for it in items]}


def _collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    out = {"latents": torch.stack([it["latents"] for it in items]), "caption": [it["caption"] for it in items]}
    for key in ("hidden", "pooled"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    return out


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def environment(device) -> dict[str, Any]:
    """Device, versions and threads of this process."""
    import diffusers
    import torch

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
    }
    for name in ("transformers", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # triton is optional on CPU
            info[name] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_config(spec: dict[str, Any], partial: Path | None = None) -> dict[str, Any]:
    """Measure every variant of one teacher x mode (``spec``: teacher, folder, mode, batch, warmup,
    repeats, device, teacher_dtype, pool_batches, work_dir, lora_rank; optional: variants, autocast,
    compile (``none`` / ``both`` / ``only``), compile_backend, compile_mode, deadline (``time.time()``
    after which no section or variant starts)). Returns rows + environment + skipped; with ``partial``, that
    result is also written there after every variant (what a run stopped from outside still leaves)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from fastgen.data.digits import DigitsDataset
    from fastgen.data.sources import DataConfig, build_latent_cache
    from fastgen.models.spec import TeacherConfig
    from fastgen.trainers.lcd import LCD, LCDConfig
    from fastgen.trainers.method import SampleConfig

    device = torch.device(spec["device"])
    cache_dir = Path(spec["work_dir"]) / f"cache-{spec['teacher']}-{spec['mode']}"
    t0 = time.perf_counter()
    data_spec = DataConfig(latent_cache=True, cache_dir=os.fspath(cache_dir))
    method = LCD(
        LCDConfig(lora=spec["mode"] == "lora", lora_rank=int(spec.get("lora_rank", 64)),
                  lora_alpha=float(spec.get("lora_rank", 64)), seed=0),
        teacher=TeacherConfig(path=os.fspath(spec["folder"]), dtype=spec["teacher_dtype"]),
        data=data_spec,
        sample=SampleConfig(eval_samples=0),
    )
    method.to(device)
    method.train()
    setup_s = time.perf_counter() - t0

    b = int(spec["batch"])
    n_items = b * int(spec["pool_batches"])
    data = DigitsDataset("train", method.nets.resolution)
    pool = torch.utils.data.Subset(data, list(range(n_items)))
    pixel_batches = [
        _to_device(_collate_pixels([pool[j] for j in range(i, i + b)]), device) for i in range(0, n_items, b)
    ]
    variants = list(spec.get("variants") or VARIANTS)
    cache_build_s, cache_items, cached_batches = None, 0, []
    if "cached" in variants:
        t0 = time.perf_counter()
        cache = build_latent_cache(data_spec, pool, method.teacher, str(Path(spec["folder"]).resolve()), method.nets.resolution)
        cache_build_s = round(time.perf_counter() - t0, 3)
        cache_items = len(cache)
        cached_batches = [
            _to_device(_collate_cached([cache[j] for j in range(i, i + b)]), device) for i in range(0, n_items, b)
        ]

    unet_params = sum(p.numel() for n, p in method.teacher.net.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for ps in method.parameter_groups().values() for p in ps)
    shape = method.teacher.latent_shape(b, method.nets.resolution, method.nets.resolution)
    common = {
        "teacher": spec["teacher"],
        "mode": spec["mode"],
        "resolution": method.nets.resolution,
        "latent_shape": list(shape[1:]),
        "teacher_dtype": spec["teacher_dtype"],
        "device": str(device),
        "unet_params": unet_params,
        "trainable_params": trainable,
        "setup_s": round(setup_s, 3),
        "cache_build_s": cache_build_s,
        "cache_items": cache_items,
        "autocast": spec.get("autocast") or "none",
    }
    autocast = spec.get("autocast")
    compile_choice = spec.get("compile") or "none"
    sections = {"none": ["eager"], "both": ["eager", "compiled"], "only": ["compiled"]}[compile_choice]
    deadline = spec.get("deadline")
    environment_info = environment(device)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {"rows": rows, "environment": environment_info, "skipped": skipped}

    def save_partial() -> None:
        if partial is not None:
            tmp = partial.with_name(partial.name + ".tmp")
            tmp.write_text(json.dumps(result(), default=str), encoding="utf-8")
            os.replace(tmp, partial)

    def out_of_time() -> bool:
        return deadline is not None and time.time() > float(deadline)

    def batches_for(variant: str) -> list[dict[str, Any]]:
        return cached_batches if variant == "cached" else pixel_batches

    for section in sections:
        label = "none"
        if section == "compiled":
            backend, mode = spec.get("compile_backend") or "inductor", spec.get("compile_mode") or "default"
            label = f"{backend}/{mode}"
            if out_of_time():
                skipped += [{"teacher": spec["teacher"], "mode": spec["mode"], "compile": label, "variant": v,
                             "reason": "not started: time budget spent"} for v in variants]
                save_partial()
                continue
            compiled = compile_networks(method, backend, mode)
            print(f"[train_throughput] torch.compile (backend {backend}, mode {mode}, dynamic=False) of {compiled}; "
                  "each variant's first steps compile its shapes", file=sys.stderr, flush=True)
        for variant in variants:
            if out_of_time():
                skipped.append({"teacher": spec["teacher"], "mode": spec["mode"], "compile": label, "variant": variant,
                                "reason": "not started: time budget spent"})
                save_partial()
                continue
            # priming: one-off allocations and, under torch.compile, the compilation of this variant's shapes
            prime_s = prime_variants(method, [variant], batches_for, int(spec.get("prime", 1)), autocast).get(variant)
            if out_of_time():
                skipped.append({"teacher": spec["teacher"], "mode": spec["mode"], "compile": label, "variant": variant,
                                "reason": f"primed ({prime_s} s) but not measured: time budget spent"})
                save_partial()
                continue
            print(f"[train_throughput] {spec['teacher']} / {spec['mode']} / {variant} / compile {label}: "
                  f"primed in {prime_s} s; {spec['warmup']} warm-up + {spec['repeats']} timed steps",
                  file=sys.stderr, flush=True)
            row = dict(common, compile=label, prime_s=prime_s)
            if section == "compiled":
                row.update(_dynamo_counts())
            row.update(measure_variant(method, variant, batches_for(variant), int(spec["warmup"]), int(spec["repeats"]),
                                       autocast=autocast, count_calls=section == "eager"))
            rows.append(row)
            print(f"[train_throughput]   {row['sec_per_step_median']:.4f} s/step, {row['samples_per_s']:.3f} samples/s, "
                  f"peak +{row['peak_mem_mb']:.1f} MiB", file=sys.stderr, flush=True)
            save_partial()
    return result()


# =========================================================================== the optimisation ladder

#: The rungs of ``--study ladder``, in order. ``reference`` is the step of diffusers' example LCD scripts
#: (uncached VAE and text encoding of every batch, the teacher's uncond and cond passes as two forwards,
#: every network in float32, torch's default AdamW); each further rung adds one optimisation to the best
#: configuration so far and is kept only where it holds (see :func:`keep_rung`).
LADDER: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("reference", {"cache": False, "cfg_forward": "separate", "teacher_dtype": "float32", "fused": None,
                   "channels_last": False, "compile": False, "checkpointing": False, "autocast": None, "ema": "loop"},
     "example-script step: uncached VAE + text encoding, two teacher forwards, float32, default AdamW, "
     "EMA target updated parameter by parameter"),
    ("cache", {"cache": True}, "latents and text embeddings from the cache (data.latent_cache): no VAE encode, no text encoder"),
    ("batched_cfg", {"cfg_forward": "batched"}, "the teacher's uncond and cond rows in one forward of batch 2B"),
    ("fused_adamw", {"fused": True}, "torch's fused AdamW step (one kernel over all parameters)"),
    ("foreach_ema", {"ema": "foreach"}, "the EMA target updated by one foreach lerp over all its tensors (fastgen's "
     "ema_update_)"),
    ("bf16_teacher", {"teacher_dtype": "bfloat16"},
     "frozen teacher weights (LoRA: the frozen base) and text encoders held in bf16; the student's maths stays float32"),
    ("fp16_teacher", {"teacher_dtype": "float16"}, "the same frozen weights in fp16 instead"),
    ("channels_last", {"channels_last": True}, "convolution networks in the channels-last memory format"),
    ("compile", {"compile": True}, "torch.compile (inductor, dynamic=False) of teacher (with freezing), student, target"),
    ("checkpointing", {"checkpointing": True},
     "gradient checkpointing of the student (its activations recomputed in backward): memory for compute"),
    ("bf16_autocast", {"autocast": "bf16"},
     "the step's forward under torch.autocast(bf16) (train.mixed_precision: bf16): the student's maths in bf16 too"),
)
#: Rungs left out of the default ladder on a CPU (bf16 autocast is a GPU option; ``--rungs`` still runs it).
GPU_ONLY_RUNGS = ("bf16_autocast",)
#: A rung that is not faster by this factor is kept only when it saves memory (see :func:`keep_rung`).
KEEP_SPEEDUP = 1.02
KEEP_MEMORY = 0.95
KEEP_SLOWDOWN = 0.90


def keep_rung(speedup: float, mem_ratio: float | None) -> bool:
    """Whether a rung's change stays in the optimised step: ``speedup`` (its samples/s over the best
    configuration before it) >= KEEP_SPEEDUP, or it saves >= 5% peak memory for at most 10% of the speed."""
    if speedup >= KEEP_SPEEDUP:
        return True
    return mem_ratio is not None and speedup >= KEEP_SLOWDOWN and mem_ratio <= KEEP_MEMORY


def ladder_method(spec: dict[str, Any], opts: dict[str, Any]):
    """A fresh LCD object for one rung (``opts``: the rung's options), on the spec's device, speed options applied."""
    import torch

    from fastgen.data.sources import DataConfig
    from fastgen.models.spec import TeacherConfig
    from fastgen.trainers.engine import speed
    from fastgen.trainers.lcd import LCD, LCDConfig
    from fastgen.trainers.method import SampleConfig

    rank = int(spec.get("lora_rank", 64))
    method = LCD(
        LCDConfig(lora=spec["mode"] == "lora", lora_rank=rank, lora_alpha=float(rank), seed=0,
                  gradient_checkpointing=bool(opts.get("checkpointing"))),
        teacher=TeacherConfig(path=os.fspath(spec["folder"]), dtype=opts["teacher_dtype"], cfg_forward=opts["cfg_forward"]),
        data=DataConfig(),
        sample=SampleConfig(eval_samples=0),
    )
    method.to(torch.device(spec["device"]))
    method.train()
    if opts.get("ema") == "loop" and method.nets.target is not None:
        method.nets.update_target = types.MethodType(_update_target_per_parameter, method.nets)
    info: dict[str, Any] = {}
    if opts.get("channels_last"):
        info["channels_last"] = speed.apply_channels_last(method)
    if opts.get("compile"):
        info["compiled"] = speed.compile_step_networks(method, spec.get("compile_mode") or "default",
                                                       freeze_constant=bool(spec.get("freeze", True)),
                                                       backend=spec.get("compile_backend") or "inductor")
    return method, info


def _update_target_per_parameter(nets, decay: float) -> None:
    """The example script's EMA update: ``target <- decay * target + (1 - decay) * student``, one parameter at a time."""
    for t, s in zip(nets.target.parameters(), nets.student.parameters()):
        t.detach().mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def ladder_optimizer(method, fused: bool | None):
    """AdamW as the trainer builds it (:func:`fastgen.trainers.engine.optim.build_optimizer`): lr 1e-5,
    betas 0.9/0.999, eps 1e-8, no weight decay; ``fused`` None = torch's default implementation."""
    from fastgen.trainers.engine.optim import ResolvedSpec, build_optimizer

    spec = ResolvedSpec(optimizer="adamw", learning_rate=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        momentum=0.0, max_grad_norm=None, lr_scheduler="constant", warmup_steps=0, fused=fused)
    params = [p for ps in method.parameter_groups().values() for p in ps]
    return build_optimizer(params, spec, "student")


class Config:
    """One configuration of the ladder, built and alive: its LCD object, optimizer, batches and memory."""

    def __init__(self, spec: dict[str, Any], opts: dict[str, Any], pixel_batches, cached_batches) -> None:
        import torch

        self.opts = opts
        self.device = torch.device(spec["device"])
        self.autocast = opts.get("autocast")
        self.batches = cached_batches if opts["cache"] else pixel_batches
        self.step = 0
        gc.collect()
        malloc_trim()
        t0 = time.perf_counter()
        self.method, self.info = ladder_method(spec, opts)
        self.optimizer = ladder_optimizer(self.method, opts.get("fused"))
        self.build_s = time.perf_counter() - t0
        #: what the configuration's networks hold: every parameter and buffer in its dtype, each storage once
        #: (counted, not read from the process: weights loaded from safetensors may sit in file-backed pages that
        #: the resident-set size counts only once they are touched)
        self.weights_mb = tensor_bytes(self.method) / 2**20
        torch.manual_seed(0)
        _sync(self.device)
        before = retained_memory_mb(self.device)
        t0 = time.perf_counter()
        for _ in range(int(spec.get("prime", 1))):  # first-use allocations; under compile, the compilation
            self.run_step()
        _sync(self.device)
        self.prime_s = time.perf_counter() - t0
        #: what the first step(s) left allocated for good: the optimizer state, compiled graphs and the constants
        #: they fold in (a frozen network's prepacked weights), caches of first use
        self.retained_mb = max(retained_memory_mb(self.device) - before, 0.0)
        # the step's own memory, alone in its window: activations, gradients, optimizer state, temporaries
        window = MemoryWindow(self.device)
        window.start()
        self.losses = [self.run_step() for _ in range(max(int(spec["warmup"]), 1))]
        self.step_mb, _ = window.stop()
        self.mem_method = window.method
        self.times: list[float] = []

    @property
    def peak_mem_mb(self) -> float:
        return self.weights_mb + self.retained_mb + self.step_mb

    def run_step(self) -> float:
        loss = train_iteration(self.method, self.optimizer, self.batches[self.step % len(self.batches)], self.step, self.autocast)
        self.step += 1
        return loss

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.losses.append(self.run_step())
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt

    def close(self) -> None:
        import torch

        compiled = bool(self.opts.get("compile"))
        self.method = self.optimizer = None
        if compiled:
            torch._dynamo.reset()
        gc.collect()
        malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def retained_memory_mb(device) -> float:
    """The memory the process holds in allocations of its own, in MiB, after a garbage collection: on CUDA the
    allocated bytes; on CPU the anonymous resident set (``RssAnon``), which leaves out file-backed pages (weights
    mapped from safetensors files, counted by :func:`tensor_bytes` instead) so that nothing is counted twice."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    malloc_trim()
    kb = proc_status_kb("RssAnon")
    if kb is None:  # not Linux: the whole resident set
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            return 0.0
    return kb / 1024


def tensor_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers, each underlying storage counted once (shared weights,
    a LoRA student on the teacher's own UNet)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def paired_times(a: Config, b: Config, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` timed steps of each configuration, interleaved A B, B A, A B ... so that a drift in the
    machine's speed reaches both alike; returns the two lists of seconds."""
    ta, tb = [], []
    for r in range(rounds):
        for cfg, out in (((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))):
            out.append(cfg.timed_step())
    return ta, tb


def _row_fields(cfg: Config, times: list[float], batch: int) -> dict[str, Any]:
    from fastgen.trainers.engine import speed

    median = statistics.median(times)
    return {
        "sec_per_step_median": median, "sec_per_step_min": min(times), "sec_per_step_all": [round(t, 6) for t in times],
        "samples_per_s": batch / median, "peak_mem_mb": round(cfg.peak_mem_mb, 2), "weights_mb": round(cfg.weights_mb, 2),
        "retained_mb": round(cfg.retained_mb, 2), "step_mem_mb": round(cfg.step_mb, 2), "mem_method": cfg.mem_method, "build_s": round(cfg.build_s, 3),
        "prime_s": round(cfg.prime_s, 3), "loss_last": cfg.losses[-1],
        **({"compile_counters": speed.compile_counters()} if cfg.opts.get("compile") else {}), **cfg.info,
    }


def run_ladder(spec: dict[str, Any], partial: Path | None = None) -> dict[str, Any]:
    """The optimisation ladder of one teacher x mode in this process (see :data:`LADDER`).

    The reference configuration is built first. Each rung builds the best configuration so far plus its change
    and times the two interleaved (:func:`paired_times`), so its ratio to the best is measured side by side;
    a kept change makes the trial the new best. Each configuration's memory is its weights (measured over its
    build) plus its step's peak (measured alone). Finally the reference is built again and timed interleaved
    with the optimised configuration: the row ``optimised`` and the summary's speedup."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from fastgen.data.digits import DigitsDataset
    from fastgen.data.sources import DataConfig, build_latent_cache
    from fastgen.models.teacher import Teacher

    device = torch.device(spec["device"])
    rungs = [r for r in LADDER if r[0] in (spec.get("rungs") or [r[0] for r in LADDER])]
    if not rungs or rungs[0][0] != "reference":
        raise ValueError("the ladder starts at the reference rung")
    b = int(spec["batch"])
    rounds = int(spec["repeats"])
    # pixels + captions, and their cached latents + embeddings (encoded once, by a float32 teacher)
    teacher = Teacher.from_pretrained(spec["folder"]).to(device)
    resolution = int(spec.get("resolution") or teacher.default_resolution)
    n_items = b * int(spec["pool_batches"])
    pool = torch.utils.data.Subset(DigitsDataset("train", resolution), list(range(n_items)))
    pixel_batches = [_to_device(_collate_pixels([pool[j] for j in range(i, i + b)]), device) for i in range(0, n_items, b)]
    cache = build_latent_cache(DataConfig(latent_cache=True, cache_dir=os.fspath(Path(spec["work_dir"]) / f"cache-{spec['teacher']}")),
                               pool, teacher, str(Path(spec["folder"]).resolve()), resolution)
    cached_batches = [_to_device(_collate_cached([cache[j] for j in range(i, i + b)]), device) for i in range(0, n_items, b)]
    shape = teacher.latent_shape(b, resolution, resolution)
    del teacher
    gc.collect()

    env = environment(device)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    deadline = spec.get("deadline")
    common = {"teacher": spec["teacher"], "mode": spec["mode"], "batch": b, "resolution": resolution,
              "latent_shape": list(shape[1:]), "device": str(device)}

    def save_partial() -> None:
        if partial is not None:
            tmp = partial.with_name(partial.name + ".tmp")
            tmp.write_text(json.dumps({"rows": rows, "environment": env, "skipped": skipped}, default=str), encoding="utf-8")
            os.replace(tmp, partial)

    def out_of_time() -> bool:
        return deadline is not None and time.time() > float(deadline)

    def skip(name: str, reason: str) -> None:
        skipped.append({"teacher": spec["teacher"], "mode": spec["mode"], "variant": name, "reason": reason})
        save_partial()

    def build(name: str, opts: dict[str, Any]) -> Config | None:
        print(f"[train_throughput] ladder {spec['teacher']} / {spec['mode']} / {name}: {opts}", file=sys.stderr, flush=True)
        try:
            return Config(spec, opts, pixel_batches, cached_batches)
        except Exception as exc:  # a rung this device or torch build cannot run is reported, not fatal
            print(f"[train_throughput]   {name} failed: {exc}", file=sys.stderr, flush=True)
            gc.collect()
            skip(name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            return None

    ref_name, ref_opts, ref_what = rungs[0]
    best = build(ref_name, dict(ref_opts))
    if best is None:
        return {"rows": rows, "environment": env, "skipped": skipped}
    ref_mem = best.peak_mem_mb
    best_row: dict[str, Any] | None = None  # the reference row is written with its first pairing
    best_vs_ref = 1.0
    for name, change, what in rungs[1:]:
        if out_of_time():
            skip(name, "not started: time budget spent")
            continue
        if name == "foreach_ema" and spec["mode"] == "lora":
            skip(name, "not applicable: LoRA mode has no EMA target")
            continue
        trial = build(name, dict(best.opts, **change))
        if trial is None:
            continue
        tb, tt = paired_times(best, trial, rounds)
        if best_row is None:
            best_row = dict(common, variant=ref_name, change=ref_what, options=best.opts, kept=True,
                            speedup_over_previous=1.0, mem_over_previous=1.0, speedup_vs_reference=1.0, mem_vs_reference=1.0,
                            **_row_fields(best, tb, b))
            rows.append(best_row)
        ratio = statistics.median(tb) / statistics.median(tt)
        mem_ratio = _ratio(trial.peak_mem_mb, best.peak_mem_mb)
        kept = keep_rung(ratio, mem_ratio)
        row = dict(common, variant=name, change=what, options=trial.opts, kept=kept, speedup_over_previous=ratio,
                   mem_over_previous=mem_ratio, speedup_vs_reference=best_vs_ref * ratio,
                   mem_vs_reference=_ratio(trial.peak_mem_mb, ref_mem), paired_with_sec_per_step_median=statistics.median(tb),
                   **_row_fields(trial, tt, b))
        rows.append(row)
        print(f"[train_throughput]   {row['sec_per_step_median']:.4f} s/step against {statistics.median(tb):.4f} interleaved: "
              f"{ratio:.3f}x the best so far ({row['speedup_vs_reference']:.3f}x reference), peak {row['peak_mem_mb']:.0f} MiB "
              f"({row['mem_vs_reference']:.3f}x reference); {'kept' if kept else 'dropped'}", file=sys.stderr, flush=True)
        if kept:
            best.close()
            best, best_vs_ref = trial, best_vs_ref * ratio
        else:
            trial.close()
        save_partial()
    # the optimised configuration against a fresh reference, interleaved: the headline ratio
    if rows and not out_of_time() and any(r["kept"] for r in rows[1:]):
        ref = build(ref_name + " (again)", dict(ref_opts))
        if ref is not None:
            tr, to = paired_times(ref, best, rounds)
            final = dict(common, variant="optimised", change="every kept change, timed interleaved with a fresh reference",
                         options=best.opts, kept=True, speedup_over_previous=None, mem_over_previous=None,
                         speedup_vs_reference=statistics.median(tr) / statistics.median(to),
                         mem_vs_reference=_ratio(best.peak_mem_mb, ref.peak_mem_mb),
                         paired_with_sec_per_step_median=statistics.median(tr),
                         reference_peak_mem_mb=round(ref.peak_mem_mb, 2), **_row_fields(best, to, b))
            rows.append(final)
            print(f"[train_throughput] optimised {final['sec_per_step_median']:.4f} s/step against the reference's "
                  f"{statistics.median(tr):.4f} interleaved: {final['speedup_vs_reference']:.3f}x; peak memory "
                  f"{final['mem_vs_reference']:.3f}x", file=sys.stderr, flush=True)
            ref.close()
    elif rows:  # nothing was kept: the reference is the optimised configuration
        rows[0]["note"] = "no change was kept: the reference is the fastest configuration measured"
    best.close()
    save_partial()
    return {"rows": rows, "environment": env, "skipped": skipped}


LADDER_MD_COLUMNS = ["teacher", "mode", "variant", "kept", "batch", "resolution", "sec_per_step_median",
                     "paired_with_sec_per_step_median", "samples_per_s", "speedup_over_previous", "speedup_vs_reference",
                     "weights_mb", "retained_mb", "step_mem_mb", "peak_mem_mb", "mem_over_previous", "mem_vs_reference", "prime_s", "device"]


def ladder_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per teacher x mode: the optimised configuration against the reference, timed interleaved (the
    ``optimised`` row), and which changes it kept."""
    out = []
    for key in dict.fromkeys((r["teacher"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["teacher"], r["mode"]) == key]
        ref = next((r for r in group if r["variant"] == "reference"), None)
        best = next((r for r in group if r["variant"] == "optimised"), None)
        if ref is None:
            continue
        rungs = [r for r in group if r["variant"] not in ("reference", "optimised")]
        entry = {
            "teacher": key[0], "mode": key[1], "batch": ref["batch"], "resolution": ref["resolution"],
            "kept": ", ".join(r["variant"] for r in rungs if r["kept"]) or "(none)",
            "dropped": ", ".join(r["variant"] for r in rungs if not r["kept"]) or "(none)",
        }
        if best is None:  # nothing kept: the reference is the optimised configuration
            entry.update(reference_samples_per_s=ref["samples_per_s"], optimised_samples_per_s=ref["samples_per_s"],
                         speedup=1.0, reference_peak_mem_mb=ref["peak_mem_mb"], optimised_peak_mem_mb=ref["peak_mem_mb"],
                         mem_ratio=1.0)
        else:
            entry.update(reference_samples_per_s=ref["batch"] / best["paired_with_sec_per_step_median"],
                         optimised_samples_per_s=best["samples_per_s"], speedup=best["speedup_vs_reference"],
                         reference_peak_mem_mb=best["reference_peak_mem_mb"], optimised_peak_mem_mb=best["peak_mem_mb"],
                         mem_ratio=best["mem_vs_reference"])
        out.append(entry)
    return out


def render_ladder_markdown(result: dict[str, Any]) -> str:
    from fastgen.evaluation.reports import markdown_table

    p = result["protocol"]
    lines = [
        *_header(p, "LCD training step: the reference step against the optimised step"),
        *([f"Rows of other teacher x modes kept from earlier runs (`--append`): "
           + "; ".join(f"`{c['command']}` ({c['date']})" for c in p["earlier_commands"]) + ".", ""]
          if p.get("earlier_commands") else []),
        "Every row of one teacher x mode ran in the same process. `reference` is the step of diffusers' example LCD "
        "scripts: uncached VAE and text encoding of every batch, the teacher's uncond and cond passes as two forwards, "
        "every network in float32, torch's default AdamW, the EMA target updated parameter by parameter. Each further "
        "row builds the best configuration so far plus one change and times the two interleaved (A B, B A, ...), so "
        "`speedup_over_previous` is a side-by-side ratio; the change is kept when it is "
        f">= {KEEP_SPEEDUP}x faster, or saves >= {round((1 - KEEP_MEMORY) * 100)}% peak memory for at most "
        f"{round((1 - KEEP_SLOWDOWN) * 100)}% of the speed. `speedup_vs_reference` of a rung chains the kept ratios; the "
        "`optimised` row is every kept change timed interleaved with a freshly built reference (the summary's figures). "
        "Peak memory = the configuration's weights (the bytes of its parameters and buffers) + what its first step left allocated (optimizer state, compiled graphs) + its step's peak (measured alone). "
        f"One step = {p['step']}. Timing: {p['timing']}. Memory: {p['memory_definition']} ({p['memory']}).",
        "",
        "## Optimised against reference",
        "",
        markdown_table(result["summary"], ["teacher", "mode", "batch", "resolution", "reference_samples_per_s",
                                           "optimised_samples_per_s", "speedup", "reference_peak_mem_mb",
                                           "optimised_peak_mem_mb", "mem_ratio", "kept", "dropped"]).rstrip("\n"),
        "",
        "## Each change's contribution",
        "",
        markdown_table(result["rows"], LADDER_MD_COLUMNS).rstrip("\n"),
        "",
        "Changes: " + "; ".join(f"`{n}`: {w}" for n, _, w in LADDER) + ".",
        "",
    ]
    lines += _footer(result)
    return "\n".join(lines)


def plot_ladder(result: dict[str, Any], path: Path) -> Path | None:
    """Samples/s and peak memory of every rung relative to the reference, one panel pair per teacher x mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys((r["teacher"], r["mode"]) for r in result["rows"]))
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (teacher, mode), (ax_s, ax_m) in zip(groups, axes):
        rows = [r for r in result["rows"] if (r["teacher"], r["mode"]) == (teacher, mode)]
        names = [r["variant"] for r in rows]
        colours = ["tab:green" if r["variant"] == "optimised" else ("tab:blue" if r.get("kept") else "tab:gray") for r in rows]
        ax_s.barh(names, [r["speedup_vs_reference"] for r in rows], color=colours)
        ax_s.axvline(1.0, color="k", lw=0.8)
        ax_s.invert_yaxis()
        ax_s.set_title(f"{teacher} / {mode}: samples/s vs reference")
        ax_m.barh(names, [r["mem_vs_reference"] or 0 for r in rows], color=colours)
        ax_m.axvline(1.0, color="k", lw=0.8)
        ax_m.invert_yaxis()
        ax_m.set_title("peak memory vs reference")
    fig.suptitle("LCD step ladder (blue: kept, grey: dropped, green: the optimised configuration)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# =========================================================================== orchestration


#: Seconds a worker may run past the deadline (to finish the step in flight) before it is stopped.
DEADLINE_GRACE_S = 15.0
#: ``_run_child``'s return code for a worker stopped at the deadline.
RC_DEADLINE = -1000


def _run_child(job: dict[str, Any], work: Path, name: str, deadline: float | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run one job in a worker process. With ``deadline`` (a ``time.time()`` value) the worker is stopped
    ``DEADLINE_GRACE_S`` after it (return code ``RC_DEADLINE``) and the result is what it had written after
    its last finished variant (``None`` if nothing)."""
    spec_path = work / f"{name}.spec.json"
    out_path = work / f"{name}.result.json"
    partial_path = work / f"{name}.partial.json"
    spec_path.write_text(json.dumps(job, default=str), encoding="utf-8")
    cmd = [sys.executable, os.fspath(Path(__file__).resolve()), "--worker", os.fspath(spec_path),
           "--worker-out", os.fspath(out_path)]
    timeout = None if deadline is None else max(deadline - time.time(), 0.0) + DEADLINE_GRACE_S
    proc = subprocess.Popen(cmd, cwd=os.fspath(REPO))
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        rc = RC_DEADLINE
    if rc == 0 and out_path.is_file():
        return rc, json.loads(out_path.read_text(encoding="utf-8"))
    if partial_path.is_file():
        return rc, json.loads(partial_path.read_text(encoding="utf-8"))
    return rc, None


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a worker and its children (torch.compile's compile workers), children first."""
    try:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    except Exception:  # no psutil, or the worker is already gone
        pass
    proc.kill()
    proc.wait()


def _worker_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    partial = Path(out_path).with_name(Path(out_path).name.replace(".result.", ".partial."))
    if spec.get("job") == "build_sd15":
        build_sd15_pipeline(spec["folder"], int(spec["sample_size"]), bool(spec["mini"]))
        result: dict[str, Any] = {"folder": spec["folder"]}
    elif spec.get("job") == "ladder":
        result = run_ladder(spec, partial=partial)
    else:
        result = run_config(spec, partial=partial)
    Path(out_path).write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


def _build_sd15(folder: Path, label: str, latent: int, mini: bool, work: Path, modes: list[str],
                deadline: float | None) -> list[dict[str, Any]]:
    """Build the SD1.5-architecture pipeline in a worker; returns the skipped entries of ``modes`` if it failed."""
    print(f"[train_throughput] building the {label} pipeline in {folder}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc, _ = _run_child({"job": "build_sd15", "folder": os.fspath(folder), "sample_size": latent, "mini": mini},
                       work, f"build-{label}", deadline)
    if rc != 0:
        return [{"teacher": label, "mode": m, "reason": "building the pipeline: " + _rc_reason(rc)} for m in modes]
    print(f"[train_throughput]   built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return []


def _run_job(job: dict[str, Any], work: Path, name: str, deadline: float | None,
             unit: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """One teacher x mode worker: ``(result or None, skipped entries to report, whether it failed)``; a worker
    stopped at the deadline is not a failure, and what it finished (``unit``s: variants, rungs) is kept."""
    rc, result = _run_child(job, work, name, deadline)
    reported: list[dict[str, Any]] = []
    failed = False
    if rc != 0:
        failed = rc != RC_DEADLINE
        reported.append({"teacher": job["teacher"], "mode": job["mode"], "reason": _rc_reason(rc)
                         + (f"; kept the {len(result['rows'])} {unit}(s) it had finished" if result else "")})
    if result is None:
        return None, reported, True
    return result, reported + result.get("skipped", []), failed


def _rc_reason(rc: int) -> str:
    if rc == RC_DEADLINE:
        return f"worker stopped {DEADLINE_GRACE_S:.0f} s after the time budget (--budget-s) ran out"
    if rc in (-9, 137):
        return f"worker killed (exit {rc}, SIGKILL: most likely out of memory)"
    return f"worker failed with exit code {rc} (its traceback is on stderr above)"


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Side-by-side ratios per teacher x mode x compile (same process): batched vs separate, cached vs
    batched, and for a compiled section its batched step against the eager batched step of the same process."""
    out = []
    keys = sorted({(r["teacher"], r["mode"], r.get("compile", "none")) for r in rows},
                  key=lambda k: (k[0], k[1], k[2] != "none", k[2]))
    for teacher, mode, comp in keys:
        by = {r["variant"]: r for r in rows
              if r["teacher"] == teacher and r["mode"] == mode and r.get("compile", "none") == comp}
        if "batched" not in by:
            continue
        bt = by["batched"]
        entry: dict[str, Any] = {"teacher": teacher, "mode": mode, "compile": comp}
        if "separate" in by:
            entry["batched_speedup_over_separate"] = by["separate"]["sec_per_step_median"] / bt["sec_per_step_median"]
            entry["peak_mem_batched_over_separate"] = _ratio(bt["peak_mem_mb"], by["separate"]["peak_mem_mb"])
        if "cached" in by:
            entry["cache_speedup"] = bt["sec_per_step_median"] / by["cached"]["sec_per_step_median"]
            entry["peak_mem_cached_over_batched"] = _ratio(by["cached"]["peak_mem_mb"], bt["peak_mem_mb"])
        if comp != "none":
            eager = [r for r in rows if r["teacher"] == teacher and r["mode"] == mode
                     and r.get("compile", "none") == "none" and r["variant"] == "batched"]
            if eager:
                entry["compile_speedup_batched"] = eager[0]["sec_per_step_median"] / bt["sec_per_step_median"]
        out.append(entry)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _footer(result: dict[str, Any]) -> list[str]:
    """The skipped / failed cases and the teachers' descriptions of a result's markdown."""
    lines: list[str] = []
    if result["skipped"]:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {' / '.join(str(s[k]) for k in ('teacher', 'mode', 'variant', 'compile') if s.get(k))}: {s['reason']}"
                  for s in result["skipped"]]
        lines.append("")
    lines += ["## Teachers", ""]
    lines += [f"- `{k}`: {v}" for k, v in result["protocol"]["teachers"].items()]
    lines.append("")
    return lines


def _header(p: dict[str, Any], title: str) -> list[str]:
    """Title and the device / versions / command line of a result's markdown."""
    return [
        f"# {title}",
        "",
        f"Device: {p['device']} ({p['device_name']}); torch {p['torch']}, diffusers {p['diffusers']}; "
        f"torch threads {p['torch_threads']} (OMP_NUM_THREADS={p['OMP_NUM_THREADS']}). "
        f"{'Quick mode (smoke test, numbers not meaningful). ' if p['quick'] else ''}"
        f"Generated {p['date']} by `{p['command']}`.",
        "",
    ]


def render_markdown(result: dict[str, Any]) -> str:
    from fastgen.evaluation.reports import markdown_table

    p = result["protocol"]
    lines = [
        *_header(p, "LCD training-step throughput"),
        "One step = zero_grad + `LCD.train_step` + backward + AdamW step + `after_optimizer_step`; "
        "median seconds/step over the timed steps after warm-up; samples/s = batch / median. "
        "`peak_mem_mb` = peak over the variant's steps minus the memory just before them "
        f"({p['memory']}). Variants: batched = one cond+uncond teacher forward (shipped); "
        "separate = two teacher forwards (teacher.cfg_forward = separate); "
        "cached = batches from the LCD latent/text-embedding cache (no VAE encode, no text encoder). "
        "Variants of one teacher x mode ran side by side in one process.",
        "",
        markdown_table(result["rows"], MD_COLUMNS).rstrip("\n"),
        "",
    ]
    if result["comparisons"]:
        lines += [
            "## Ratios (same process, side by side)",
            "",
            markdown_table(
                result["comparisons"],
                ["teacher", "mode", "compile", "batched_speedup_over_separate", "cache_speedup",
                 "compile_speedup_batched", "peak_mem_batched_over_separate", "peak_mem_cached_over_batched"],
            ).rstrip("\n"),
            "",
        ]
    notes = {(r["teacher"], r["mode"]): r["note"] for r in result["rows"] if r.get("note")}
    if notes:
        lines += ["## Notes", ""]
        lines += [f"- {t} / {m}: {n}" for (t, m), n in notes.items()]
        lines.append("")
    lines += _footer(result)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny repeats and the reduced-width SD1.5 stand-in (for tests)")
    ap.add_argument("--out", default=os.fspath(REPO / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant, digits teacher (default 10; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant, digits (default 2; quick 1)")
    ap.add_argument("--sd15-repeats", type=int, default=None, help="timed steps per variant, SD1.5 arch (default 3; quick 2)")
    ap.add_argument("--sd15-warmup", type=int, default=None, help="warm-up steps per variant, SD1.5 arch (default 1)")
    ap.add_argument("--prime", type=int, default=1,
                    help="unmeasured steps of every variant before the first measurement (default 1)")
    ap.add_argument("--teachers", default=",".join(TEACHERS), help="comma list of digits, sd15-arch")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of full, lora")
    ap.add_argument("--batch", type=int, default=None, help="batch of the digits teacher (default 16; quick 4)")
    ap.add_argument("--sd15-batch", type=int, default=1, help="batch of the SD1.5-architecture teacher (default 1)")
    ap.add_argument("--sd15-latent", type=int, default=16, help="latent size of the SD1.5-architecture teacher (16 = 128 px)")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--teacher-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="teacher UNet dtype; auto = float32 unless a config's float32 estimate exceeds free memory")
    ap.add_argument("--no-memory-check", action="store_true", help="run configs even when the memory estimate does not fit")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (default: torch's)")
    ap.add_argument("--tiny", action="store_true",
                    help="the reduced-width SD1.5 stand-in (sd15-arch-mini) with the normal step counts (CPU smoke runs)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of batched, separate, cached")
    ap.add_argument("--autocast", choices=["none", *AUTOCAST_DTYPES], default="none",
                    help="run the step's forward under torch.autocast in this dtype (train.mixed_precision); default none")
    ap.add_argument("--compile", choices=COMPILE_CHOICES, default="none",
                    help="torch.compile of the step's UNets: none (default), both (eager, then compiled, same process), only")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor; aot_eager "
                    "traces forward and backward without generating code: a quick check on CPU)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of the whole run: no build, section or variant starts after it, a worker still "
                         f"running {DEADLINE_GRACE_S:.0f} s later is stopped (its finished variants are kept), and the "
                         "results are rewritten after every teacher x mode")
    ap.add_argument("--work-dir", default=None, help="where the temp SD1.5 pipeline and caches go (default: system temp)")
    ap.add_argument("--study", choices=["ladder", "variants"], default="ladder",
                    help="ladder (default): the reference step, then one optimisation at a time, kept where it holds "
                         "(train_throughput.*); variants: the shipped step's batched/separate/cached variants "
                         "(train_throughput_variants.*)")
    ap.add_argument("--no-freeze", action="store_true",
                    help="ladder: compile the frozen teacher without inductor's freezing (no folded weight copies)")
    ap.add_argument("--append", action="store_true",
                    help="ladder: keep the rows of an earlier train_throughput.json in --out for the teacher x modes "
                         "this run does not measure")
    ap.add_argument("--rungs", default=None, help="ladder: comma list of rungs, starting with reference (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    args.sd15_latent_set = any(a.startswith("--sd15-latent") for a in raw)
    args.sd15_batch_set = any(a.startswith("--sd15-batch") for a in raw)
    for name in ("repeats", "warmup", "sd15_repeats", "sd15_warmup", "batch", "sd15_batch", "sd15_latent", "lora_rank"):
        v = getattr(args, name)
        if v is not None and v < (0 if "warmup" in name else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args.worker, args.worker_out)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
            return 2
    if args.study == "ladder":
        return main_ladder(args, argv)
    global RESULT_NAME
    RESULT_NAME = VARIANTS_RESULT_NAME

    started = time.time()
    deadline = started + args.budget_s if args.budget_s else None
    quick = bool(args.quick)
    mini = quick or bool(args.tiny)
    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [t for t in teachers if t not in TEACHERS] + [m for m in modes if m not in MODES]
    bad += [v for v in variants if v not in VARIANTS]
    if bad or not teachers or not modes or not variants:
        print(f"unknown or empty --teachers/--modes/--variants {bad}; teachers: {TEACHERS}, modes: {MODES}, "
              f"variants: {VARIANTS}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
            return 2
    from fastgen.zoo.paths import resolve_model  # no torch in this process while the workers run

    settings = {
        "digits": {
            "batch": args.batch or (4 if quick else 16),
            "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
            "repeats": args.repeats or (2 if quick else 10),
            "prime": args.prime,
        },
        "sd15-arch": {
            "batch": args.sd15_batch,
            "warmup": args.sd15_warmup if args.sd15_warmup is not None else 1,
            "repeats": args.sd15_repeats or (2 if quick else 3),
            "prime": args.prime,
        },
    }
    teacher_notes = {
        "digits": "the shipped sd-digits StableDiffusionPipeline (resolve_model('digits-sd')), 32 px, trained weights",
        "sd15-arch": (
            "StableDiffusionPipeline built from configs with random weights: UNet = the SD1.5 config "
            "(320/640/1280/1280, 3xCrossAttnDown + Down, Up + 3xCrossAttnUp, layers_per_block 2, "
            f"cross_attention_dim 768, attention_head_dim 8) at sample_size {args.sd15_latent}; SD1.5 VAE "
            f"architecture (factor 8, {args.sd15_latent * 8} px); CLIP-L-shaped text encoder (768 wide, 12 layers) over "
            "the digits tokenizer; digits DDIM scheduler (SD1.5 betas)"
        ),
        "sd15-arch-mini": (
            "--quick/--tiny stand-in for sd15-arch: same block types/layers/cross_attention_dim 768 at widths "
            f"32/64/64/64, 1-layer 768-wide text encoder, narrow factor-8 VAE; random weights; {args.sd15_latent * 8} px"
        ),
    }

    work = Path(tempfile.mkdtemp(prefix="fastgen-train-throughput-", dir=args.work_dir))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    env: dict[str, Any] | None = None
    failed = False
    out = Path(args.out)
    sd15_label = "sd15-arch-mini" if mini else "sd15-arch"
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def out_of_time() -> bool:
        return deadline is not None and time.time() > deadline

    def write() -> None:
        write_results(out, rows, skipped, env, args, quick, settings, teacher_notes, sd15_label, started, command)

    try:
        for teacher in teachers:
            label = teacher
            if out_of_time():
                skipped += [{"teacher": sd15_label if teacher == "sd15-arch" else teacher, "mode": m,
                             "reason": "not started: time budget (--budget-s) spent"} for m in modes]
                continue
            if teacher == "digits":
                folder = resolve_model("digits-sd")
            else:
                label = sd15_label
                folder = work / label
                reported = _build_sd15(folder, label, args.sd15_latent, mini, work, modes, deadline)
                if reported:
                    failed = True
                    skipped += reported
                    write()
                    continue
            s = settings[teacher]
            for mode in modes:
                if out_of_time():
                    skipped.append({"teacher": label, "mode": mode, "reason": "not started: time budget (--budget-s) spent"})
                    continue
                dtype = "float32" if args.teacher_dtype == "auto" else args.teacher_dtype
                avail = _available_bytes(args.device)
                need = estimate_memory_bytes(folder, mode, dtype)
                note = None
                fits = avail * MEMORY_HEADROOM if avail is not None else None
                if fits is not None and need > fits and not args.no_memory_check:
                    if args.teacher_dtype == "auto":
                        low = estimate_memory_bytes(folder, mode, "bfloat16")
                        if low <= fits:
                            note = (f"float32 estimate {need / 1e9:.1f} GB > {avail / 1e9:.1f} GB available: "
                                    "teacher UNet in bfloat16")
                            dtype, need = "bfloat16", low
                    if need > fits:
                        skipped.append({
                            "teacher": label, "mode": mode,
                            "reason": f"estimated {need / 1e9:.1f} GB needed, {avail / 1e9:.1f} GB available "
                                      "(--no-memory-check runs it anyway; --teacher-dtype bfloat16 halves the teacher)",
                        })
                        print(f"[train_throughput] skip {label}/{mode}: {skipped[-1]['reason']}", file=sys.stderr)
                        continue
                job = {
                    "job": "measure",
                    "teacher": label,
                    "folder": os.fspath(folder),
                    "mode": mode,
                    "batch": s["batch"],
                    "warmup": s["warmup"],
                    "repeats": s["repeats"],
                    "prime": s["prime"],
                    "device": args.device,
                    "teacher_dtype": dtype,
                    "pool_batches": max(1, min(4, s["warmup"] + s["repeats"])),
                    "work_dir": os.fspath(work),
                    "lora_rank": args.lora_rank,
                    "threads": args.threads,
                    "variants": variants,
                    "autocast": None if args.autocast == "none" else args.autocast,
                    "compile": args.compile,
                    "compile_backend": args.compile_backend,
                    "compile_mode": args.compile_mode,
                    "deadline": deadline,
                }
                result, reported, bad = _run_job(job, work, f"{label}-{mode}", deadline, "variant")
                skipped += reported
                failed = failed or bad
                if result is None:
                    write()
                    continue
                env = env or result["environment"]
                for row in result["rows"]:
                    row["estimated_need_gb"] = round(need / 1e9, 2)
                    if note:
                        row["note"] = note
                for row in result["rows"]:
                    base = next((r for r in result["rows"] if r["variant"] == "batched"
                                 and r.get("compile", "none") == row.get("compile", "none")), None)
                    row["speedup_vs_batched"] = (
                        base["sec_per_step_median"] / row["sec_per_step_median"] if base else None
                    )
                rows.extend(result["rows"])
                write()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write()
    print(f"[train_throughput] wrote {out / (RESULT_NAME + '.json')} and .md in {round(time.time() - started, 1)} s",
          file=sys.stderr)
    return 1 if failed else 0


def _earlier_ladder(path: Path, teachers: list[str], modes: list[str], sd15_label: str):
    """``(rows, skipped, commands)`` of an earlier ladder result at ``path`` outside this run's teacher x modes."""
    if not path.is_file():
        return [], [], []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if earlier.get("protocol", {}).get("study") != "ladder":
        return [], [], []
    labels = {sd15_label if t == "sd15-arch" else t for t in teachers}

    def other(r: dict[str, Any]) -> bool:
        return not (r.get("teacher") in labels and r.get("mode") in modes)

    p = earlier["protocol"]
    return ([r for r in earlier["rows"] if other(r)], [s for s in earlier.get("skipped", []) if other(s)],
            [*p.get("earlier_commands", []), {"command": p.get("command"), "date": p.get("date")}])


def main_ladder(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--study ladder``: per teacher x mode, one worker process runs the reference step and every rung."""
    started = time.time()
    deadline = started + args.budget_s if args.budget_s else None
    quick = bool(args.quick)
    mini = quick or bool(args.tiny)
    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    default_rungs = [n for n, _, _ in LADDER if args.device == "cuda" or n not in GPU_ONLY_RUNGS]
    rungs = [r.strip() for r in (args.rungs or ",".join(default_rungs)).split(",") if r.strip()]
    bad = [t for t in teachers if t not in TEACHERS] + [m for m in modes if m not in MODES]
    bad += [r for r in rungs if r not in {n for n, _, _ in LADDER}]
    if bad or not teachers or not modes or rungs[:1] != ["reference"]:
        print(f"unknown or empty --teachers/--modes/--rungs {bad} (the rungs start with reference); teachers: {TEACHERS}, "
              f"modes: {MODES}, rungs: {[n for n, _, _ in LADDER]}", file=sys.stderr)
        return 2
    from fastgen.zoo.paths import resolve_model

    sd15_latent = args.sd15_latent if args.sd15_latent_set else 32
    sd15_batch = args.sd15_batch if args.sd15_batch_set else 2
    settings = {
        "digits": {"batch": args.batch or (4 if quick else 32), "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
                   "repeats": args.repeats or (2 if quick else 8)},
        "sd15-arch": {"batch": sd15_batch, "warmup": args.sd15_warmup if args.sd15_warmup is not None else 1,
                      "repeats": args.sd15_repeats or (2 if quick else 3)},
    }
    sd15_label = "sd15-arch-mini" if mini else "sd15-arch"
    teacher_notes = {
        "digits": "the shipped sd-digits StableDiffusionPipeline (resolve_model('digits-sd')), 32 px (8x8x4 latents), trained weights",
        "sd15-arch": (f"StableDiffusionPipeline with the SD1.5 UNet, VAE and CLIP-L text-encoder architectures and random weights "
                      f"(see build_sd15_pipeline), {sd15_latent * 8} px = {sd15_latent}x{sd15_latent} latents"),
        "sd15-arch-mini": f"the reduced-width SD1.5-architecture stand-in (--quick/--tiny), {sd15_latent * 8} px",
    }
    work = Path(tempfile.mkdtemp(prefix="fastgen-train-ladder-", dir=args.work_dir))
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    env: dict[str, Any] | None = None
    failed = False
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    # --append: keep the earlier ladder's rows of every teacher x mode this run does not measure
    kept_rows, kept_skipped, earlier = _earlier_ladder(out / f"{RESULT_NAME}.json", teachers, modes, sd15_label) \
        if args.append else ([], [], [])

    def write() -> None:
        result = {
            "protocol": {
                "benchmark": RESULT_NAME, "study": "ladder", "quick": quick, "command": command,
                "earlier_commands": earlier,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(time.time() - started, 1), "device": args.device,
                "device_name": (env or {}).get("gpu") or (env or {}).get("cpu") or _cpu_name(),
                **{k: (env or {}).get(k) for k in ("torch", "diffusers", "transformers", "triton", "python", "torch_threads",
                                                    "torch_interop_threads", "OMP_NUM_THREADS", "cpu_count", "cuda")},
                "settings": {(sd15_label if k == "sd15-arch" else k): v for k, v in settings.items()},
                "rungs": {n: {"change": c, "what": w} for n, c, w in LADDER if n in rungs},
                "keep_rule": {"speedup_at_least": KEEP_SPEEDUP, "or_memory_at_most": KEEP_MEMORY, "with_speedup_at_least": KEEP_SLOWDOWN},
                "step": "optimizer.zero_grad(set_to_none) + LCD.train_step + loss.backward + AdamW.step + LCD.after_optimizer_step",
                "timing": "each configuration runs {prime} unmeasured priming step(s) (first-use allocations; under compile, "
                          "the compilation) and its warm-up steps, then its timed steps interleaved with the configuration it "
                          "is compared with; median seconds/step; samples/s = batch / median".replace("{prime}", str(args.prime)),
                "memory": rows[0]["mem_method"] if rows else "n/a",
                "memory_definition": "peak_mem_mb = weights_mb (the bytes of the configuration's parameters and buffers "
                                     "in their dtypes, each storage once) + retained_mb (what the priming step(s) left allocated: "
                                     "optimizer state, compiled graphs and their folded constants; anonymous resident set on "
                                     "CPU, allocated bytes on CUDA) + step_mem_mb (the peak over its warm-up steps, run alone "
                                     "after the priming step, minus the memory before them: activations, gradients, temporaries)",
                "budget_s": args.budget_s,
                "lora_rank": args.lora_rank,
                "teachers": {k: v for k, v in teacher_notes.items()
                             if k in {r["teacher"] for r in kept_rows + rows} | {s["teacher"] for s in kept_skipped + skipped}},
            },
            "rows": kept_rows + rows, "summary": ladder_summary(kept_rows + rows), "skipped": kept_skipped + skipped,
        }
        from fastgen.io import atomic_write_json, atomic_write_text

        atomic_write_json(out / f"{RESULT_NAME}.json", result)
        atomic_write_text(out / f"{RESULT_NAME}.md", render_ladder_markdown(result))
        if rows:
            plot_ladder(result, out / f"{RESULT_NAME}.png")

    try:
        for teacher in teachers:
            label = teacher
            if deadline is not None and time.time() > deadline:
                skipped += [{"teacher": sd15_label if teacher == "sd15-arch" else teacher, "mode": m,
                             "reason": "not started: time budget (--budget-s) spent"} for m in modes]
                continue
            if teacher == "digits":
                folder = resolve_model("digits-sd")
            else:
                label, folder = sd15_label, work / sd15_label
                reported = _build_sd15(folder, label, sd15_latent, mini, work, modes, deadline)
                if reported:
                    failed = True
                    skipped += reported
                    write()
                    continue
            s = settings[teacher]
            for mode in modes:
                if deadline is not None and time.time() > deadline:
                    skipped.append({"teacher": label, "mode": mode, "reason": "not started: time budget (--budget-s) spent"})
                    continue
                avail = _available_bytes(args.device)
                need = estimate_memory_bytes(folder, mode, "float32")  # the reference holds every network in float32
                if avail is not None and need > avail * MEMORY_HEADROOM and not args.no_memory_check:
                    skipped.append({"teacher": label, "mode": mode,
                                    "reason": f"the float32 reference needs an estimated {need / 1e9:.1f} GB, "
                                              f"{avail / 1e9:.1f} GB available (--no-memory-check runs it anyway)"})
                    print(f"[train_throughput] skip {label}/{mode}: {skipped[-1]['reason']}", file=sys.stderr)
                    write()
                    continue
                job = {"job": "ladder", "teacher": label, "folder": os.fspath(folder), "mode": mode, "batch": s["batch"],
                       "warmup": s["warmup"], "repeats": s["repeats"], "prime": args.prime, "device": args.device,
                       "resolution": sd15_latent * 8 if teacher == "sd15-arch" else None,
                       "pool_batches": max(1, min(4, s["warmup"] + s["repeats"])), "work_dir": os.fspath(work),
                       "lora_rank": args.lora_rank, "threads": args.threads, "rungs": rungs,
                       "compile_mode": args.compile_mode, "compile_backend": args.compile_backend, "freeze": not args.no_freeze,
                       "deadline": deadline}
                result, reported, bad = _run_job(job, work, f"ladder-{label}-{mode}", deadline, "rung")
                skipped += reported
                failed = failed or bad
                if result is None:
                    write()
                    continue
                env = env or result["environment"]
                rows.extend(result["rows"])
                write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write()
    print(f"[train_throughput] wrote {out / (RESULT_NAME + '.json')}, .md and .png in {round(time.time() - started, 1)} s",
          file=sys.stderr)
    return 1 if failed else 0


def write_results(out: Path, rows, skipped, env, args, quick, settings, teacher_notes, sd15_label, started, command) -> None:
    """Rewrite ``<out>/train_throughput.{json,md}`` (atomically) from what has been measured so far."""
    if env is None:
        import torch

        env = {"device": args.device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu": _cpu_name()}
        try:
            import diffusers

            env["diffusers"] = diffusers.__version__
        except ImportError:
            env["diffusers"] = None
    mem_method = rows[0]["mem_method"] if rows else "n/a"
    protocol = {
        "benchmark": RESULT_NAME,
        "quick": quick,
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": round(time.time() - started, 1),
        "device": args.device,
        "device_name": env.get("gpu") or env.get("cpu"),
        **{k: env.get(k) for k in ("torch", "diffusers", "transformers", "triton", "python", "torch_threads",
                                    "torch_interop_threads", "OMP_NUM_THREADS", "cpu_count", "cuda")},
        "settings": {(sd15_label if k == "sd15-arch" else k): v for k, v in settings.items()},
        "step": "optimizer.zero_grad(set_to_none) + LCD.train_step + loss.backward + AdamW.step "
                "(lr 1e-5, betas 0.9/0.999, eps 1e-8, wd 0) + LCD.after_optimizer_step; time.perf_counter per step "
                "(cuda.synchronize before and after on GPU); batches prepared before timing",
        "autocast": args.autocast,
        "compile": {"sections": args.compile, "backend": args.compile_backend, "mode": args.compile_mode,
                    "how": "nn.Module.compile(dynamic=False) of the teacher UNet, the student and the EMA target "
                           "(full mode); prime_s = the variant's first step(s), i.e. compilation of its shapes"},
        "budget_s": args.budget_s,
        "timing": "median seconds/step over the timed steps after the warm-up steps; samples/s = batch / median",
        "memory": mem_method,
        "memory_definition": "peak_mem_mb = peak over the variant's warm-up + timed steps minus the memory "
                             "just before them; peak_mem_total_mb = that absolute peak",
        "variants": {
            "batched": "shipped LCD step: Teacher.predict runs uncond+cond as one forward of batch 2B",
            "separate": "teacher.cfg_forward = separate: Teacher.predict calls the network twice (uncond batch B, "
                        "then cond batch B); same CFG combination and x0/eps conversion",
            "cached": "LCD.build_cache (the use_latent_cache path) encodes the step pool once; batches carry "
                      "latents + hidden states, so the step skips the VAE encode and the text encoder",
        },
        "processes": "each teacher x mode in its own subprocess: per section (eager, then compiled), per variant "
                     "`prime` unmeasured steps, then its warm-up and timed steps (same LCD object, a fresh AdamW "
                     "per variant, same seed per variant)",
        "lora_rank": args.lora_rank,
        "teachers": {k: v for k, v in teacher_notes.items()
                     if k in {r["teacher"] for r in rows} | {s["teacher"] for s in skipped}},
    }
    result = {"protocol": protocol, "rows": rows, "comparisons": comparisons(rows), "skipped": skipped}
    from fastgen.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / f"{RESULT_NAME}.json", result)
    atomic_write_text(out / f"{RESULT_NAME}.md", render_markdown(result))


if __name__ == "__main__":
    sys.exit(main())
