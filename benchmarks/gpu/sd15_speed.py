"""Sampling speed of an SD1.5-architecture teacher (DDIM, 50 steps, CFG) against a few-step student
(LCM scheduler, 1/2/4 steps, no CFG), eager and under ``torch.compile``.

Usage (one call on a GPU machine; ``benchmarks/gpu/run.sh`` wraps it)::

    python benchmarks/gpu/sd15_speed.py [--out DIR] [--device cuda|cpu] [--dtype fp16|bf16|fp32]
        [--resolution 512] [--warmup 3] [--repeats 10] [--no-compile] [--compile-mode reduce-overhead]
    python benchmarks/gpu/sd15_speed.py --quick --tiny --device cpu --out /tmp/sd15_quick   # CPU smoke run

Nothing is downloaded: the pipeline is built from hand-written configs with random weights. Latency
does not depend on the weights' values, only on the architecture, dtype, resolution and kernels:

* UNet: ``UNet2DConditionModel`` with the SD1.5 config (320/640/1280/1280, 3 x CrossAttnDownBlock2D +
  DownBlock2D, UpBlock2D + 3 x CrossAttnUpBlock2D, 2 layers per block, cross-attention dim 768,
  8 heads), ``sample_size`` = resolution / 8.
* VAE: ``AutoencoderKL`` with the SD config (128/256/512/512, 4 latent channels, factor 8).
* Text encoder: ``CLIPTextModel`` shaped like CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads,
  MLP 3072, 77 positions, vocabulary 49408, quick_gelu).
* Tokenizer: a byte-level ``CLIPTokenizer`` built in memory (see :func:`byte_level_clip_tokenizer`).
* Teacher: ``DDIMScheduler`` with the SD1.5 settings, guidance 7.5 (the UNet sees batch 2 per step).
  Student: the same modules with an ``LCMScheduler`` over the same betas, guidance 1.0 (batch 1).
  The student shares the teacher's UNet; a distilled student has the same architecture and so the
  same cost per step.

Every configuration is measured by :func:`fastgen.evaluation.speed.measure_pipeline_speed` in both
scopes (``end_to_end``: the whole pipeline call; ``network``: only the UNet forwards). The eager
section uses the diffusers default attention (``AttnProcessor2_0``, i.e. PyTorch SDPA). The compiled
section then sets ``torch.backends.cuda.matmul.allow_tf32 = True``, converts the UNet to
``channels_last`` and wraps it in ``torch.compile(unet, mode=--compile-mode, dynamic=False)`` (the
teacher's batch-2 and the student's batch-1 shapes each get their own static graph).

Outputs, rewritten atomically after every configuration (so a run cut short still leaves its
results): ``<out>/sd15_speed.json`` (``environment``, ``settings``, ``rows``, ``errors``, ``ratios``)
and ``<out>/sd15_speed.md``. ``ratios[section][scope]["teacher_<N>/student_<k>"]`` is the teacher's
median latency over the student's (the speed-up). A configuration that fails (out of memory, a
compile error) leaves a row with an ``error`` string and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastgen.evaluation.reports import atomic_write_text, markdown_table, write_json  # noqa: E402
from fastgen.models.architectures import CLIP_L_TEXT, SD15_UNET, SD15_VAE  # noqa: E402
from fastgen.evaluation.speed import SPEED_COLUMNS, measure_pipeline_speed, speed_ratio  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
TEACHER_GUIDANCE = 7.5
STUDENT_GUIDANCE = 1.0

SD15_TEXT = CLIP_L_TEXT
#: ``--tiny``: the same block structure at small widths (for CPU smoke runs).
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64)
TINY_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
TINY_TEXT = dict(SD15_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)

SCHEDULER_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TABLE_COLUMNS = SPEED_COLUMNS + ["compile_mode", "network_evals", "network_batch", "dtype", "attention_backend", "error"]


# =========================================================================== model building


def byte_level_clip_tokenizer():
    """A ``CLIPTokenizer`` over CLIP's byte-level alphabet with no BPE merges.

    No CLIP vocabulary ships with transformers offline. The weights are random, so which ids a prompt
    maps to does not matter; what matters for speed is the shape the text encoder sees, and every
    prompt is padded/truncated to 77 tokens as with the real tokenizer. The vocabulary is the two
    special tokens plus every byte symbol, bare and with CLIP's ``</w>`` word-end suffix (514
    entries); with no merges each character is one token. The text encoder keeps CLIP-L's 49408-row
    embedding regardless, so its size and cost are the real ones."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for symbol in (ch, ch + "</w>"):
            vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_pipelines(resolution: int, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """Teacher (DDIM) and student (LCM) ``StableDiffusionPipeline`` sharing one set of random-weight modules."""
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if resolution % 8:
        raise SystemExit(f"--resolution must be a multiple of 8 (the VAE factor), got {resolution}")
    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    text_cfg = CLIPTextConfig(
        **(TINY_TEXT if tiny else SD15_TEXT),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = UNet2DConditionModel(**dict(TINY_UNET if tiny else SD15_UNET, sample_size=resolution // 8))
    vae = AutoencoderKL(**dict(TINY_VAE if tiny else SD15_VAE, sample_size=resolution))
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False).to(device)
        if dtype != torch.float32:  # built in float32; cast only when another dtype is asked for
            module.to(dtype)

    teacher_scheduler = DDIMScheduler(
        **SCHEDULER_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon"
    )
    student_scheduler = LCMScheduler(**SCHEDULER_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False)

    def pipeline(scheduler):
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )

    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    return pipeline(teacher_scheduler), pipeline(student_scheduler), params


# =========================================================================== environment


def _git_commit() -> str | None:
    """The checked-out commit, read from ``.git`` files (no git executable needed)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
            if (common / ref).is_file():
                return (common / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except Exception:
        return None
    return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fastgen_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        env.update(
            gpu_name=torch.cuda.get_device_name(idx),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
        )
    return env


# =========================================================================== running


class Recorder:
    """Collects rows and errors and rewrites the JSON and markdown after every configuration."""

    def __init__(self, out: Path, env: dict, settings: dict) -> None:
        self.out = out
        self.env = env
        self.settings = settings
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.ratios: dict[str, Any] = {}
        self.started = time.perf_counter()

    def add_rows(self, rows: list[dict], **extra) -> None:
        for r in rows:
            r.update(extra)
            self.rows.append(r)
        self.flush()

    def add_error(self, where: dict, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        entry = dict(where, error=message[:2000], traceback=traceback.format_exc(limit=8)[-4000:])
        self.errors.append(entry)
        for scope in where.get("scopes", ("end_to_end", "network")):
            row = {k: v for k, v in where.items() if k != "scopes"}
            self.rows.append(dict(row, scope=scope, error=message[:300]))
        print(f"[sd15_speed] FAILED {where}: {message[:500]}", flush=True)
        self.flush()

    def payload(self) -> dict:
        return {
            "benchmark": "sd15_speed",
            "environment": self.env,
            "settings": self.settings,
            "elapsed_s": round(time.perf_counter() - self.started, 2),
            "rows": self.rows,
            "errors": self.errors,
            "ratios": self.ratios,
        }

    def flush(self) -> None:
        write_json(self.out / "sd15_speed.json", self.payload())
        atomic_write_text(self.out / "sd15_speed.md", self.markdown())

    def markdown(self) -> str:
        env = self.env
        lines = [
            "# SD1.5-architecture sampling speed: teacher (DDIM + CFG) vs few-step student (LCM)",
            "",
            "Random-weight SD1.5 architecture (speed only). "
            f"Device: {env.get('gpu_name') or env.get('device')}; torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}, "
            f"driver {env.get('driver')}); diffusers {env.get('diffusers')}; commit {env.get('fastgen_commit')}.",
            f"Settings: {', '.join(f'{k}={v}' for k, v in self.settings.items())}.",
            "",
            markdown_table(self.rows, TABLE_COLUMNS),
        ]
        if self.ratios:
            ratio_rows = []
            for section, per_scope in self.ratios.items():
                for scope, values in per_scope.items():
                    for name, value in values.items():
                        ratio_rows.append({"section": section, "scope": scope, "ratio": name, "value": value})
            lines += ["## Speed-ups (teacher median latency / student median latency)", "",
                      markdown_table(ratio_rows, ["section", "scope", "ratio", "value"])]
        return "\n".join(lines)


def _section_ratios(rows: list[dict], teacher: str, student: str, teacher_steps: int, student_steps, scopes) -> dict:
    result: dict[str, dict[str, Any]] = {}
    for scope in scopes:
        values: dict[str, Any] = {}
        for k in student_steps:
            name = f"teacher_{teacher_steps}/student_{k}"
            try:
                values[name] = speed_ratio(rows, (teacher, teacher_steps), (student, k), scope=scope)
            except Exception as exc:  # a failed configuration has no latency
                values[name] = f"unavailable: {exc}"
        result[scope] = values
    return result


def run_section(rec: Recorder, section: str, teacher_pipe, student_pipe, args, compile_mode: str) -> None:
    suffix = "" if section == "eager" else "+compile"
    teacher_label, student_label = f"teacher-ddim{suffix}", f"student-lcm{suffix}"
    common = dict(
        prompt=PROMPT,
        batch_size=args.batch,
        height=args.resolution,
        width=args.resolution,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        scopes=tuple(args.scopes),
        compile_mode=compile_mode,
    )
    configs = [(teacher_label, teacher_pipe, args.teacher_steps, TEACHER_GUIDANCE)]
    configs += [(student_label, student_pipe, k, STUDENT_GUIDANCE) for k in args.student_steps]
    extra = {"section": section, "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    for label, pipe, steps, guidance in configs:
        where = {"section": section, "pipeline": label, "steps": steps, "guidance": guidance,
                 "compile_mode": compile_mode, "scopes": tuple(args.scopes)}
        if args.budget_s and time.perf_counter() - rec.started > args.budget_s:
            rec.add_error(where, TimeoutError(f"skipped: time budget of {args.budget_s}s spent"))
            continue
        t0 = time.perf_counter()
        try:
            rows = measure_pipeline_speed(pipe, label=label, steps=steps, guidance=guidance, **common)
        except Exception as exc:
            rec.add_error(where, exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        rec.add_rows(rows, wall_s=round(time.perf_counter() - t0, 2), **extra)
        for r in rows:
            print(
                f"[sd15_speed] {section:8s} {label:22s} steps={steps:<3d} {r['scope']:10s} "
                f"median={r['latency_s_median'] * 1e3:9.2f} ms  p90={r['latency_s_p90'] * 1e3:9.2f} ms  "
                f"img/s={r['images_per_s']:8.2f}  evals={r['network_evals']} batch={r['network_batch']}  "
                f"mem={r['peak_mem_mb']:.0f} MB ({r['peak_mem_kind']})",
                flush=True,
            )
    section_rows = [r for r in rec.rows if r.get("section") == section and "error" not in r]
    rec.ratios[section] = _section_ratios(
        section_rows, teacher_label, student_label, args.teacher_steps, args.student_steps, args.scopes
    )
    rec.flush()


def compile_unet(teacher_pipe, student_pipe, mode: str) -> None:
    """channels_last + ``torch.compile`` of the shared UNet, installed in both pipelines."""
    unet = teacher_pipe.unet
    unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(unet, mode=None if mode == "default" else mode, dynamic=False)
    teacher_pipe.unet = compiled
    student_pipe.unet = compiled


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"),
                    help="output folder (default: $OUT if set, else benchmarks/results/gpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 elsewhere")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; --quick 64)")
    ap.add_argument("--batch", type=int, default=1, help="images per pipeline call (default 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration (default 3; --quick 0)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per configuration and scope (default 10; --quick 1)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="teacher DDIM steps (default 50; --quick 4)")
    ap.add_argument("--student-steps", type=_int_list, default=[1, 2, 4], help="comma list of student steps (default 1,2,4)")
    ap.add_argument("--scopes", type=lambda s: [x for x in s.split(",") if x], default=["end_to_end", "network"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    ap.add_argument("--compile", action="store_true", help="run the torch.compile section even with --quick")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode: reduce-overhead (default), max-autotune-no-cudagraphs, max-autotune, default")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: resolution 64, teacher 4 steps, warmup 0, repeats 1, fp32, no compile section")
    ap.add_argument("--tiny", action="store_true", help="narrow stand-in networks (UNet 32/64/64/64, text encoder 64 wide)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip configurations that would start after this many seconds (recorded as errors)")
    args = ap.parse_args(argv)
    q = args.quick
    args.resolution = args.resolution or (64 if q else 512)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 3)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 10)
    args.teacher_steps = args.teacher_steps or (4 if q else 50)
    args.dtype = args.dtype or ("fp32" if q or not args.device.startswith("cuda") else "fp16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[sd15_speed] --device cuda asked for but CUDA is not available", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    run_compile = not args.no_compile and (args.compile or not args.quick)
    settings = {
        "resolution": f"{args.resolution}x{args.resolution}",
        "batch": args.batch,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "teacher": f"DDIM {args.teacher_steps} steps, guidance {TEACHER_GUIDANCE}",
        "student": f"LCM {args.student_steps} steps, guidance {STUDENT_GUIDANCE}",
        "networks": "tiny stand-in" if args.tiny else "SD1.5 architecture",
        "compile": args.compile_mode if run_compile else "skipped",
        "quick": args.quick,
    }
    rec = Recorder(out, environment(args.device), settings)
    print(f"[sd15_speed] {settings}", flush=True)

    t0 = time.perf_counter()
    try:
        teacher_pipe, student_pipe, params = build_pipelines(args.resolution, args.tiny, args.device, dtype, args.seed)
    except Exception as exc:
        rec.add_error({"section": "build", "pipeline": "sd15", "scopes": ()}, exc)
        return 1
    rec.env["parameters"] = params
    rec.env["build_s"] = round(time.perf_counter() - t0, 2)
    print(f"[sd15_speed] built pipelines in {rec.env['build_s']} s; parameters {params}", flush=True)

    run_section(rec, "eager", teacher_pipe, student_pipe, args, "none")

    if run_compile:
        where = {"section": "compiled", "pipeline": "unet", "compile_mode": args.compile_mode, "scopes": ()}
        try:
            if args.device.startswith("cuda"):
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            compile_unet(teacher_pipe, student_pipe, args.compile_mode)
        except Exception as exc:
            rec.add_error(where, exc)
        else:
            run_section(rec, "compiled", teacher_pipe, student_pipe, args, args.compile_mode)

    rec.env["total_s"] = round(time.perf_counter() - rec.started, 2)
    rec.flush()
    print(f"[sd15_speed] ratios (teacher/student median latency): {rec.ratios}", flush=True)
    print(f"[sd15_speed] wrote {out / 'sd15_speed.json'} and {out / 'sd15_speed.md'}", flush=True)
    ok = [r for r in rec.rows if "error" not in r]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
