"""Quality-vs-iteration curve of a digits-world run, from its in-training evaluations.

Usage::

    python benchmarks/training_curve.py RUN_DIR --name boot_curve [--out benchmarks/results]
        [--reference benchmarks/results/digits_quality.json --reference-row teacher@50] [--no-initial]
    python benchmarks/training_curve.py dmd=runs/dmd-digits disback=runs/disback-digits --name disback_convergence \
        --x generator-updates

Several runs (``LABEL=RUN_DIR``) share one plot. ``--x generator-updates`` puts them on the number of
generator updates made before each evaluation (score distillation: the fake score steps every iteration,
the generator every ``fake_updates_per_generator_update``-th one, after DisBack's ``degradation_steps``).

Reads ``RUN_DIR/metrics.jsonl`` (the trainer's evaluations every ``train.eval_every`` steps: 1000 samples,
the canonical balanced digits prompts, the benchmark's per-chunk seeds, so the same protocol as ``make bench``)
and, unless ``--no-initial``, scores the untrained student at step 0 with the same evaluator. The reference
row (e.g. the teacher at 50 steps) is read from a benchmark result of the same protocol. Writes
``<out>/<name>.json`` (protocol, rows, reference), ``<out>/<name>.md`` and ``<out>/<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ["step", "digits_fid", "digit_accuracy", "colour_accuracy"]


def read_evaluations(run_dir: Path) -> list[dict]:
    rows = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; train the run with train.eval_every > 0 first")
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if "digits_fid" in record:
            rows[int(record["step"])] = {k: record[k] for k in COLUMNS if k in record} | {"samples": record.get("samples")}
    if not rows:
        raise SystemExit(f"error: {path} holds no digits evaluation; train with train.eval_every > 0 and sample.eval_samples > 0")
    return [rows[s] for s in sorted(rows)]


def initial_row(run_dir: Path) -> dict:
    """The student before training (the method built from the run's config, no checkpoint), same evaluator."""
    import torch

    from fastgen.evaluation.training import TrainingEvaluator
    from fastgen.trainers.engine.run import build_method, load_run_config

    cfg, cls = load_run_config(run_dir / "config.yaml")
    method = build_method(cfg, cls).eval()
    with torch.no_grad():
        scores = TrainingEvaluator()(method, 0)
    return {"step": 0, **{k: scores[k] for k in COLUMNS[1:]}, "samples": scores["samples"]}


def reference_row(path: Path, label: str) -> dict | None:
    if not path.is_file():
        return None
    name, _, steps = label.partition("@")
    for row in json.loads(path.read_text(encoding="utf-8")).get("rows", []):
        if row.get("method") == name and str(row.get("steps")) == steps:
            return {"label": label, "digits_fid": row["digits_fid"], "digit_accuracy": row.get("digit_accuracy"), "source": str(path)}
    return None


def generator_updates(config: dict, step: int) -> int:
    """Generator updates in iterations ``0 .. step - 1`` of a score-distillation run (``config``: its method section)."""
    ratio = int(config["fake_updates_per_generator_update"])
    start = int(config.get("degradation_steps", 0)) if int(config.get("path_nodes", 0) or 0) > 0 else 0
    return max(0, -(-(step - start) // ratio))


def plot(runs: list[dict], reference: dict | None, path: Path, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ax.plot([r["x"] for r in run["rows"]], [r["digits_fid"] for r in run["rows"]], "o-", label=f"{run['label']}, 1 step")
    if reference:
        ax.axhline(reference["digits_fid"], color="gray", linestyle="--", label=f"{reference['label']}")
        ax.axhline(2 * reference["digits_fid"], color="gray", linestyle=":", label=f"2 x {reference['label']}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("digits-FID (1000 samples, lower is better)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def read_run(spec: str, x: str, initial: bool) -> dict:
    import yaml

    label, sep, folder = spec.partition("=")
    run_dir = Path(folder if sep else spec)
    rows = read_evaluations(run_dir)
    if initial and rows[0]["step"] != 0:
        rows.insert(0, initial_row(run_dir))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    method = config["method"]
    section = config.get(method.replace("-", "_")) or {}
    if x == "generator-updates" and "fake_updates_per_generator_update" not in section:
        raise SystemExit(f"error: {run_dir} is a {method} run without generator updates; use --x iteration")
    for r in rows:
        r["x"] = generator_updates(section, r["step"]) if x == "generator-updates" else r["step"]
    return {"label": label if sep else method, "run": str(run_dir), "method": method, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR or LABEL=RUN_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--reference", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    p.add_argument("--reference-row", default="teacher@50")
    p.add_argument("--no-initial", action="store_true")
    p.add_argument("--x", choices=("iteration", "generator-updates"), default="iteration")
    args = p.parse_args(argv)

    from fastgen.io import atomic_write_json, atomic_write_text

    runs = [read_run(spec, args.x, not args.no_initial) for spec in args.runs]
    reference = reference_row(args.reference, args.reference_row)
    xlabel = "training iteration" if args.x == "iteration" else "generator updates"
    result = {"name": args.name, "x": args.x, "runs": runs, "reference": reference,
              "protocol": "digits world: 1000 samples over the canonical balanced prompts, seed 0 per chunk of 250 "
                          "(the digits_quality suite's protocol), scored by the shipped digits classifier"}
    if len(runs) == 1:
        result.update(run=runs[0]["run"], method=runs[0]["method"], rows=runs[0]["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", result)
    methods = ", ".join(r["label"] for r in runs)
    lines = [f"# {args.name}: digits-FID vs {xlabel} ({methods})", "", f"{result['protocol']}.", ""]
    for run in runs:
        lines += [f"## {run['label']} (`{run['run']}`)", "", f"| step | {xlabel} | digits-FID | digit accuracy | colour accuracy |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['x']} | {r['digits_fid']:.2f} | {r['digit_accuracy']:.3f} | {r['colour_accuracy']:.3f} |"
                  for r in run["rows"]]
        lines.append("")
    if reference:
        lines += [f"Reference: {reference['label']} digits-FID {reference['digits_fid']:.2f} (2x = "
                  f"{2 * reference['digits_fid']:.2f}), from `{reference['source']}`."]
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    plot(runs, reference, args.out / f"{args.name}.png", f"{methods}: digits-FID vs {xlabel}", xlabel)
    for run in runs:
        for r in run["rows"]:
            print(f"{run['label']} step {r['step']:>6} ({xlabel} {r['x']}): digits-FID {r['digits_fid']:.2f}  "
                  f"digit acc {r['digit_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
