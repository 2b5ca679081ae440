"""benchmarks/training_curve.py: the quality-vs-iteration curve of a run from its in-training evaluations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_curve_from_metrics_with_reference(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: boot\noutput_dir: runs/x\n")
    rows = [{"step": 100, "loss": 1.0}, {"step": 200, "digits_fid": 90.0, "digit_accuracy": 0.9, "colour_accuracy": 1.0, "samples": 1000.0},
            {"step": 100, "digits_fid": 150.0, "digit_accuracy": 0.5, "colour_accuracy": 0.9, "samples": 1000.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ref = tmp_path / "q.json"
    ref.write_text(json.dumps({"rows": [{"method": "teacher", "steps": 50, "digits_fid": 60.0, "digit_accuracy": 1.0}]}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_curve.py"), str(run), "--name", "c", "--out", str(out),
                        "--reference", str(ref), "--no-initial"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "c.json").read_text())
    assert [row["step"] for row in data["rows"]] == [100, 200] and data["rows"][1]["digits_fid"] == 90.0
    assert data["reference"]["digits_fid"] == 60.0 and data["method"] == "boot"
    assert "| 200 | 200 | 90.00 |" in (out / "c.md").read_text() and (out / "c.png").stat().st_size > 1000
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_curve.py"), str(tmp_path), "--name", "c"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "metrics.jsonl" in missing.stderr


def test_generator_updates_of_score_distillation_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from training_curve import generator_updates

    dmd = {"fake_updates_per_generator_update": 5}
    disback = {"fake_updates_per_generator_update": 5, "path_nodes": 4, "degradation_steps": 200}
    assert [generator_updates(dmd, s) for s in (0, 1, 5, 6, 100)] == [0, 1, 1, 2, 20]
    assert [generator_updates(disback, s) for s in (100, 200, 201, 300)] == [0, 0, 1, 20]
    assert generator_updates({**disback, "path_nodes": 0}, 100) == 20
