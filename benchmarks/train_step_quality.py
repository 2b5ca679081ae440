"""The optimised training step against the float32 reference step: the same recipe, the same seed, and
the student's quality after training.

Usage::

    python benchmarks/train_step_quality.py [--recipe lcd-digits] [--out benchmarks/results]
        [--runs-dir runs] [--optimised "data.latent_cache=true train.compile=true ..."] [--reuse]

Trains the recipe twice with ``fastgen train`` (one after the other, each alone on the machine):

* ``fp32``: the recipe as it ships (every network in float32, its data path, eager);
* ``optimised``: the same recipe with the optimised step's options (default :data:`OPTIMISED`: the
  latent cache, the teacher and text encoders held in bf16, ``torch.compile`` of the step networks
  with the frozen teacher folded in, fused AdamW): every option of the ladder in
  ``benchmarks/train_throughput.py`` that changes the step's numerics or its data path.

Both end with the recipe's own evaluation (1000 samples, 4 steps, the ``make bench`` protocol) in
``metrics.jsonl``; the loss curves come from the runs' tensorboard logs. Writes
``<out>/train_step_quality.{json,md,png}``: final digits-FID, digit and colour accuracy of both runs,
their ratio, the loss curves (and the mean absolute gap of their running means), wall time per run and
the steps' samples/s as the trainer logged them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_NAME = "train_step_quality"
#: The optimised step's recipe overrides (what ``--optimised`` replaces).
OPTIMISED = ("data.latent_cache=true", "teacher.dtype=bfloat16", "train.compile=true", "train.optimizers.student.fused=true")
#: What both runs share on top of the recipe (quiet logs, tensorboard for the loss curve).
COMMON = ("train.log_with=tensorboard", "train.progress=false", "train.log_every=10")


#: written beside a run's metrics: how long its training took and the command that trained it
TIMING_FILE = "train_step_quality_timing.json"


def run_training(recipe: str, run_dir: Path, overrides: list[str], reuse: bool) -> dict[str, Any]:
    """``fastgen train RECIPE output_dir=RUN_DIR ...`` in a subprocess; returns its wall time and command (with
    ``reuse`` and a finished run: what the run recorded when it was trained)."""
    if reuse and (run_dir / "metrics.jsonl").is_file():
        timing = run_dir / TIMING_FILE
        recorded = json.loads(timing.read_text(encoding="utf-8")) if timing.is_file() else {"wall_s": None}
        return {**recorded, "reused": True}
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"error: {run_dir} exists and is not empty; move it aside or pass --reuse to read a finished run")
    cmd = [sys.executable, "-m", "fastgen.cli", "train", recipe, f"output_dir={run_dir}", *COMMON, *overrides]
    print("[train_step_quality] " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    info = {"wall_s": round(time.time() - t0, 1), "command": " ".join(shlex.quote(c) for c in cmd[2:])}
    (run_dir / TIMING_FILE).write_text(json.dumps(info), encoding="utf-8")
    return {**info, "reused": False}


def final_evaluation(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "digits_fid" in r]
    if not rows:
        raise SystemExit(f"error: {run_dir / 'metrics.jsonl'} has no digits evaluation; the recipe needs train.eval_every")
    last = max(rows, key=lambda r: r["step"])
    return {k: last.get(k) for k in ("step", "digits_fid", "digit_accuracy", "colour_accuracy", "samples")}


def scalar_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the trainer logged to tensorboard (``loss``, ``samples_per_s``, ...) as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            curves.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
        break
    return {k: sorted(dict(v).items()) for k, v in curves.items()}


def running_mean(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def compare(fp32: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    ratio = fast["final"]["digits_fid"] / fp32["final"]["digits_fid"]
    a, b = dict(fp32["curves"].get("loss", [])), dict(fast["curves"].get("loss", []))
    steps = sorted(set(a) & set(b))
    gap = None
    if steps:
        ma, mb = running_mean([a[s] for s in steps]), running_mean([b[s] for s in steps])
        gap = sum(abs(x - y) for x, y in zip(ma, mb)) / len(steps)
        level = sum(ma) / len(ma)
    return {
        "fid_ratio_optimised_over_fp32": ratio,
        "within_10_percent": abs(ratio - 1.0) <= 0.10,
        "loss_running_mean_abs_gap": gap,
        "loss_running_mean_level": level if steps else None,
        "loss_steps_compared": len(steps),
    }


def sps(curves: dict[str, list[tuple[int, float]]]) -> float | None:
    values = [v for s, v in curves.get("samples_per_s", []) if s > 50]  # past compilation and first-use costs
    values.sort()
    return values[len(values) // 2] if values else None


def render_markdown(result: dict[str, Any]) -> str:
    from fastgen.evaluation.reports import markdown_table

    p = result["protocol"]
    rows = [{"run": name, **r["final"], "median_samples_per_s_logged": r["samples_per_s"], "wall_s": r["wall_s"],
             "overrides": " ".join(r["overrides"]) or "(the recipe)"} for name, r in result["runs"].items()]
    c = result["comparison"]
    return "\n".join([
        "# The optimised training step against the float32 step: quality after training",
        "",
        f"Recipe `{p['recipe']}` trained twice with the same seed ({p['seed']}), one run after the other. Generated "
        f"{p['date']} by `{p['command']}`; torch {p['torch']}, {p['device']}.",
        "",
        markdown_table(rows, ["run", "step", "digits_fid", "digit_accuracy", "colour_accuracy", "samples",
                              "median_samples_per_s_logged", "wall_s", "overrides"]).rstrip("\n"),
        "",
        f"digits-FID optimised / fp32: **{c['fid_ratio_optimised_over_fp32']:.3f}** "
        f"({'within' if c['within_10_percent'] else 'outside'} 10%). Loss curves (logged every 10 steps): mean absolute gap "
        f"of their 5-point running means {c['loss_running_mean_abs_gap']:.4g} at a mean level of "
        f"{c['loss_running_mean_level']:.4g}, over {c['loss_steps_compared']} logged steps (`{RESULT_NAME}.png`). "
        "The optimised run's latents come from the cache (encoded in the cache's batches, so they round slightly "
        "differently) and its teacher runs in bf16, so the two runs' trajectories part from the first step on; the "
        "ratio includes that run-to-run spread.",
        "",
        f"Evaluation: the trainer's final evaluation ({int(result['runs']['fp32']['final']['samples'])} samples, the canonical digits "
        "prompts, the `make bench` protocol). "
        "`median_samples_per_s_logged` is the trainer's own throughput log past step 50 (includes data loading, "
        "clipping and logging; `train_throughput.md` has the step alone, side by side).",
        "",
    ])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, r in result["runs"].items():
        curve = r["curves"].get("loss", [])
        if curve:
            steps = [s for s, _ in curve]
            ax.plot(steps, running_mean([v for _, v in curve]), label=f"{name} (digits-FID {r['final']['digits_fid']:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (5-point running mean)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{result['protocol']['recipe']}: fp32 vs optimised step, same seed")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="lcd-digits")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("--optimised", default=" ".join(OPTIMISED), help="the optimised run's recipe overrides")
    ap.add_argument("--extra", default="", help="overrides of both runs (e.g. train.max_steps=20 for a smoke run)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs instead of training them again")
    args = ap.parse_args(argv)
    import torch

    from fastgen.config import load_config  # noqa: F401  (fails early when fastgen is not importable)
    from fastgen.io import atomic_write_json, atomic_write_text

    runs_dir = Path(args.runs_dir)
    extra = shlex.split(args.extra)
    plans = {"fp32": [], "optimised": shlex.split(args.optimised)}
    runs: dict[str, Any] = {}
    for name, overrides in plans.items():
        run_dir = runs_dir / f"{args.recipe}-step-{name}"
        info = run_training(args.recipe, run_dir, [*overrides, *extra], args.reuse)
        curves = scalar_curves(run_dir)
        runs[name] = {"run_dir": str(run_dir), "overrides": overrides + extra, **info, "final": final_evaluation(run_dir),
                      "curves": curves, "samples_per_s": sps(curves)}
    import yaml

    seed = yaml.safe_load((runs_dir / f"{args.recipe}-step-fp32" / "config.yaml").read_text())["train"]["seed"]
    result = {
        "protocol": {"benchmark": RESULT_NAME, "recipe": args.recipe, "seed": seed, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "command": "python benchmarks/train_step_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "torch": torch.__version__, "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)},
        "runs": runs,
        "comparison": compare(runs["fp32"], runs["optimised"]),
    }
    out = Path(args.out)
    atomic_write_json(out / f"{RESULT_NAME}.json", result)
    atomic_write_text(out / f"{RESULT_NAME}.md", render_markdown(result))
    plot(result, out / f"{RESULT_NAME}.png")
    c = result["comparison"]
    print(f"[train_step_quality] digits-FID fp32 {runs['fp32']['final']['digits_fid']:.3f}, optimised "
          f"{runs['optimised']['final']['digits_fid']:.3f}: ratio {c['fid_ratio_optimised_over_fp32']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
