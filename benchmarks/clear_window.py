"""CLEAR's quality / window trade-off on the digits DiT, from the bench results of one protocol.

Usage::

    python benchmarks/clear_window.py [--quality benchmarks/results/digits_quality.json]
        [--speed benchmarks/results/sampling_speed.json] [--teacher dit-teacher@50]
        [clear@50 clear-local@50 clear-r1@50 | LABEL@STEPS=RUN_DIR ...] [--out benchmarks/results]

Each CLEAR point is a row of the quality results (``LABEL@STEPS``) and the configuration it was trained with:
the run's saved configuration that the bench recorded for that label in the results' protocol, or, with
``=RUN_DIR``, that run's ``config.yaml`` (its radius and pooled-KV factor). The window is counted exactly on
the teacher's token grid (32 px through the factor-2 VAE and 2x2 packing: 8x8 image tokens, 32 T5 tokens):
the mean number of keys an image query sees besides the text (its clipped disk of image tokens plus the
pooled KV tokens, ``down_factor >= 2``) as a share of the image tokens, and the attention FLOPs of the whole
joint sequence as a share of full attention. The teacher (full attention) is the point at 100%. The speed
results, when they hold the same labels, add the measured network latency.

Writes ``<out>/clear_window.json``, ``.md`` and ``.png``. Nothing is re-measured here: run
``fastgen bench quality benchmarks/suites/digits.yaml only=dit-teacher,clear,clear-local,clear-r1`` first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_POINTS = ["clear@50", "clear-local@50", "clear-r1@50"]


def quality_row(rows: list[dict], label: str) -> dict:
    name, _, steps = label.partition("@")
    for row in rows:
        if row.get("method") == name and str(row.get("steps")) == steps:
            return row
    raise SystemExit(f"error: no row {label!r} in the quality results; bench it first "
                     f"(fastgen bench quality benchmarks/suites/digits.yaml only={name})")


def network_latency(speed: dict | None, label: str) -> float | None:
    if not speed:
        return None
    name, _, steps = label.partition("@")
    for row in speed.get("rows", []):
        if row.get("pipeline") == name and str(row.get("steps")) == steps and row.get("scope") == "network":
            return float(row["latency_s_median"])
    return None


def _latency(seconds: float | None) -> str:
    return "not timed" if seconds is None else f"{seconds:.3f}"


def run_config(run_dir: Path) -> dict:
    """The CLEAR run's ``config.yaml``, or, when the run folder is gone, the shipped recipe of the same name
    (``fastgen/recipes/<folder name>.yaml``, which the bench trained the row from)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        path = Path(__file__).resolve().parents[1] / "fastgen" / "recipes" / f"{run_dir.name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {run_dir / 'config.yaml'} does not exist and no recipe {path.name} ships; name the CLEAR "
                         "run the row was benchmarked from")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if config.get("method") != "clear":
        raise SystemExit(f"error: {path} is a {config.get('method')!r} run, not a CLEAR one")
    return config


def measured_config(quality: dict, label: str) -> dict:
    """The run configuration the bench recorded for ``label`` (``LABEL@STEPS``) in the results' protocol."""
    name = label.partition("@")[0]
    entry = quality.get("protocol", {}).get("pipelines", {}).get(name) or {}
    config = entry.get("run_config")
    if not config:
        raise SystemExit(f"error: the quality results record no run configuration for {name!r}; bench it from a recipe "
                         f"or name its run folder ({label}=RUN_DIR)")
    if config.get("method") != "clear":
        raise SystemExit(f"error: {name!r} was measured from a {config.get('method')!r} run, not a CLEAR one")
    return config


def plot(points: list[dict], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    local = sorted([p for p in points if not p.get("pooled_keys")] + [teacher], key=lambda p: p["image_window_share"])
    pooled = [p for p in points if p.get("pooled_keys")]
    ax.plot([100 * p["image_window_share"] for p in local], [p["digits_fid"] for p in local], "o-", color="tab:blue",
            label="window only")
    if pooled:
        ax.plot([100 * p["image_window_share"] for p in pooled], [p["digits_fid"] for p in pooled], "*", markersize=11,
                color="tab:orange", label="window + pooled KV")
    for p in local + pooled:
        below = bool(p.get("pooled_keys"))  # pooled points sit next to their window-only sibling: label them below
        ax.annotate(f"{p['label']}\nacc {p['digit_accuracy']:.3f}", (100 * p["image_window_share"], p["digits_fid"]),
                    textcoords="offset points", xytext=(8, -14 if below else 10), va="top" if below else "bottom", fontsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.axhline(1.1 * teacher["digits_fid"], color="gray", linestyle=":", label="1.1 x teacher")
    ax.axvline(25, color="gray", linestyle="--", alpha=0.5, label="25% of the image tokens")
    ax.set_xscale("log")
    ax.set_xlabel("keys per image query: window + pooled (% of the 64 image tokens, log)")
    ax.set_ylabel("digits-FID (1000 samples, 50 steps)")
    ax.set_title("CLEAR on the digits DiT: quality vs window")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("points", nargs="*", default=DEFAULT_POINTS, help="LABEL@STEPS=RUN_DIR of each CLEAR row")
    p.add_argument("--quality", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    p.add_argument("--speed", type=Path, default=Path("benchmarks/results/sampling_speed.json"))
    p.add_argument("--teacher", default="dit-teacher@50")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)

    from fastgen.attention.mask import flop_fraction, normalize_radius, num_pooled_tokens
    from fastgen.io import atomic_write_json, atomic_write_text
    from fastgen.zoo.paths import DIT_MAX_SEQUENCE_LENGTH, DIT_RESOLUTION

    if not args.quality.is_file():
        raise SystemExit(f"error: {args.quality} does not exist; run fastgen bench quality benchmarks/suites/digits.yaml first")
    quality = json.loads(args.quality.read_text(encoding="utf-8"))
    speed = json.loads(args.speed.read_text(encoding="utf-8")) if args.speed.is_file() else None
    grid = DIT_RESOLUTION // 4  # factor-2 VAE, then 2x2 packing into tokens
    text_len = DIT_MAX_SEQUENCE_LENGTH

    def point(label: str, config: dict | None, run: str | None) -> dict:
        row = quality_row(quality["rows"], label)
        radius, down_factor, pooled = None, None, 0
        if config is None:
            share, flops, keys = 1.0, 1.0, grid * grid
        else:
            radius = normalize_radius(config["clear"]["radius"])
            down_factor = int(config["clear"].get("down_factor", 1))
            pooled = num_pooled_tokens(grid, grid, down_factor)
            acc = flop_fraction(grid, grid, text_len, radius, down_factor)
            keys = acc["mean_image_window"] + pooled
            share, flops = keys / (grid * grid), acc["ideal"]
        return {"label": label, "radius": radius, "down_factor": down_factor, "pooled_keys": pooled, "run": run,
                "image_keys_per_query": round(keys, 3),
                "image_window_share": round(share, 4), "attention_flop_fraction": round(flops, 4),
                "digits_fid": row["digits_fid"], "digit_accuracy": row.get("digit_accuracy"),
                "colour_accuracy": row.get("colour_accuracy"), "samples": row.get("samples"),
                "network_latency_s": network_latency(speed, label)}

    teacher = point(args.teacher, None, None)
    points = []
    for spec in args.points:
        label, sep, run = spec.partition("=")
        if "@" not in label:
            raise SystemExit(f"error: {spec!r}: write LABEL@STEPS or LABEL@STEPS=RUN_DIR")
        config = run_config(Path(run)) if sep else measured_config(quality, label)
        points.append(point(label, config, run or None))
        points[-1]["train_steps"] = config.get("train", {}).get("max_steps")
    for pt in points:
        pt["fid_vs_teacher"] = round(pt["digits_fid"] / teacher["digits_fid"], 3)
    result = {"name": "clear_window", "grid": f"{grid}x{grid} image tokens + {text_len} text tokens",
              "teacher": teacher, "points": points, "quality_source": str(args.quality),
              "protocol": quality.get("protocol", {}).get("suite")}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "clear_window.json", result)
    lines = ["# CLEAR on the digits DiT: quality vs window", "",
             f"Token grid {result['grid']}; rows from `{args.quality}` (same protocol: 1000 samples, 50 steps, "
             "true CFG against the empty prompt).", "",
             "Keys per image query count the image tokens of its clipped window plus the pooled KV tokens "
             "(`down_factor` f >= 2: the image pooled in f x f cells); the text keys are visible to all and not counted. "
             "The network time is the speed results' row of the same label: the speed results record no run "
             "configuration, so that row may have been timed with an earlier export of the label.", "",
             "| row | radius | pooled keys | training steps | keys / image query | share of image tokens "
             "| attention FLOPs vs full | digits_fid | vs teacher | digit_accuracy | network s / image (sampling_speed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pt in [teacher] + points:
        ratio = pt.get("fid_vs_teacher", 1.0)
        pooled = "" if pt["radius"] is None else f"{pt['pooled_keys']}" + (f" (f = {pt['down_factor']})" if pt["pooled_keys"] else "")
        lines.append(f"| {pt['label']} | {pt['radius'] if pt['radius'] is not None else 'full'} | {pooled} | {pt.get('train_steps') or ''} | "
                     f"{pt['image_keys_per_query']:.2f} | {100 * pt['image_window_share']:.1f}% | "
                     f"{100 * pt['attention_flop_fraction']:.1f}% | {pt['digits_fid']:.2f} | {ratio:.3f} | "
                     f"{pt['digit_accuracy']} | {_latency(pt['network_latency_s'])} |")
    atomic_write_text(args.out / "clear_window.md", "\n".join(lines) + "\n")
    plot(points, teacher, args.out / "clear_window.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
