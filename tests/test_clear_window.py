"""benchmarks/clear_window.py: CLEAR's quality / window trade-off from bench rows and the runs' radii."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "clear_window.py"


def _run(tmp_path, radius):
    run = tmp_path / f"r{radius}"
    run.mkdir()
    (run / "config.yaml").write_text(f"method: clear\noutput_dir: x\nclear:\n  radius: {radius}\n")
    return run


def test_window_table_and_plot(tmp_path):
    r2, r1 = _run(tmp_path, 2), _run(tmp_path, 1)
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"rows": [
        {"method": "dit-teacher", "steps": 50, "digits_fid": 40.0, "digit_accuracy": 0.98, "samples": 1000},
        {"method": "clear", "steps": 50, "digits_fid": 44.0, "digit_accuracy": 0.97, "samples": 1000},
        {"method": "clear-r1", "steps": 50, "digits_fid": 60.0, "digit_accuracy": 0.9, "samples": 1000}]}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), f"clear@50={r2}", f"clear-r1@50={r1}", "--quality", str(quality),
                        "--speed", str(tmp_path / "none.json"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "clear_window.json").read_text())
    by = {p["radius"]: p for p in data["points"]}
    # 8x8 grid: r = 1 sees only itself; r = 2 sees the 3x3 neighbourhood, clipped at the borders
    # (4 corners x 4 + 24 edges x 6 + 36 interior x 9 = 484 pairs over 64 queries)
    assert by[1]["image_keys_per_query"] == 1.0 and by[2]["image_keys_per_query"] == round(484 / 64, 3)
    assert data["teacher"]["image_window_share"] == 1.0 and by[2]["fid_vs_teacher"] == 1.1
    assert by[1]["attention_flop_fraction"] < by[2]["attention_flop_fraction"] < 1.0
    assert "| clear@50 | 2 |" in (out / "clear_window.md").read_text() and (out / "clear_window.png").stat().st_size > 1000


def test_missing_row_and_wrong_run_are_named(tmp_path):
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"rows": [{"method": "dit-teacher", "steps": 50, "digits_fid": 40.0}]}))
    r = subprocess.run([sys.executable, str(SCRIPT), f"clear@50={_run(tmp_path, 2)}", "--quality", str(quality),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no row 'clear@50'" in r.stderr and "only=clear" in r.stderr
    other = tmp_path / "lcd"
    other.mkdir()
    (other / "config.yaml").write_text("method: lcd\n")
    quality.write_text(json.dumps({"rows": [{"method": "dit-teacher", "steps": 50, "digits_fid": 40.0},
                                            {"method": "clear", "steps": 50, "digits_fid": 40.0}]}))
    r = subprocess.run([sys.executable, str(SCRIPT), f"clear@50={other}", "--quality", str(quality),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not a CLEAR one" in r.stderr


def test_a_missing_run_folder_falls_back_to_the_shipped_recipe(tmp_path):
    """The bench trains rows from the shipped recipes: without the run folder, its radius and steps come from
    fastgen/recipes/<folder name>.yaml; a name no recipe has is an error."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("clear_window_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.run_config(tmp_path / "clear-digits-r1")["clear"]["radius"] == 1
    assert module.run_config(tmp_path / "clear-digits")["clear"]["radius"] == 2.2
    assert module.run_config(tmp_path / "clear-digits")["train"]["max_steps"] >= 1
    with pytest.raises(SystemExit, match="no recipe"):
        module.run_config(tmp_path / "not-a-run")


def test_points_from_the_recorded_run_configs_count_pooled_keys(tmp_path):
    """Without run folders the configuration comes from the bench's protocol entry of each label; pooled KV
    tokens (down_factor 8 on the 8x8 grid: one) add to the keys of every image query."""
    def config(radius, down_factor):
        return {"method": "clear", "train": {"max_steps": 3200}, "clear": {"radius": radius, "down_factor": down_factor}}

    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"rows": [
        {"method": "dit-teacher", "steps": 50, "digits_fid": 40.0, "digit_accuracy": 0.98},
        {"method": "clear", "steps": 50, "digits_fid": 43.0, "digit_accuracy": 0.98},
        {"method": "clear-local", "steps": 50, "digits_fid": 45.0, "digit_accuracy": 0.97}],
        "protocol": {"pipelines": {"dit-teacher": {"folder": "x"}, "clear": {"run_config": config(2.2, 8)},
                                   "clear-local": {"run_config": config(2.2, 1)}}}}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "clear@50", "clear-local@50", "--quality", str(quality),
                        "--speed", str(tmp_path / "none.json"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    by = {p["label"]: p for p in json.loads((out / "clear_window.json").read_text())["points"]}
    local, pooled = by["clear-local@50"], by["clear@50"]
    assert (local["pooled_keys"], pooled["pooled_keys"]) == (0, 1) and pooled["down_factor"] == 8
    assert pooled["image_keys_per_query"] == round(local["image_keys_per_query"] + 1, 3)
    assert local["attention_flop_fraction"] < pooled["attention_flop_fraction"] and pooled["train_steps"] == 3200
    assert "| clear@50 | 2.2 | 1 (f = 8) | 3200 |" in (out / "clear_window.md").read_text()
    # a label the protocol does not record as a CLEAR run is named
    r = subprocess.run([sys.executable, str(SCRIPT), "dit-teacher@50", "--quality", str(quality), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no run configuration for 'dit-teacher'" in r.stderr
