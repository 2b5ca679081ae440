"""`fastgen bench`: suites, the metric registry, quality and speed reports, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastgen.cli import main
from fastgen.config import config_from_dict
from fastgen.errors import ConfigError
from fastgen.evaluation.bench import Suite, build_metrics, load_prompt_set
from fastgen.workflows.bench import load_suite


def suite_from_dict(data: dict) -> Suite:
    return config_from_dict(Suite, data)

from tiny_models import make_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_suite_yaml_overrides_and_unknown_keys(tmp_path):
    suite = load_suite("benchmarks/suites/digits.yaml", ["samples=40", "pipelines.1.steps=[2]", "speed.repeats=3"])
    assert suite.samples == 40 and suite.pipelines[1].steps == [2] and suite.speed.repeats == 3
    assert [p.label for p in suite.pipelines][:3] == ["teacher", "lcd", "lcd-lora"] and suite.speed.ratio == ["teacher@50", "lcd@4"]
    assert {"rg-lcd-direct", "rg-lcd-lrm", "scott", "boot", "dit-teacher", "clear"} <= {p.label for p in suite.pipelines}
    with pytest.raises(ConfigError, match="did you mean 'samples'"):
        suite_from_dict({"name": "x", "sampels": 3, "pipelines": [{"label": "a", "folder": "f"}]})
    with pytest.raises(ConfigError, match="needs a 'folder'"):
        suite_from_dict({"name": "x", "pipelines": [{"label": "a"}]})
    with pytest.raises(ConfigError, match="unique"):
        suite_from_dict({"name": "x", "pipelines": [{"label": "a", "folder": "f"}, {"label": "a", "folder": "g"}]})
    with pytest.raises(ConfigError, match="not a valid list index"):
        load_suite("benchmarks/suites/digits.yaml", ["pipelines.99.steps=[2]"])
    with pytest.raises(ConfigError, match=r"pipelines.1.stepz.*did you mean 'steps'"):
        load_suite("benchmarks/suites/digits.yaml", ["pipelines.1.stepz=[2]"])
    with pytest.raises(ConfigError, match=r"speed.repeats' .*expects int"):
        load_suite("benchmarks/suites/digits.yaml", ["speed.repeats=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_suite(tmp_path / "nope.yaml")
    # suite files: typed values, unknown keys with a suggestion, YAML errors naming the file
    (tmp_path / "typo.yaml").write_text("name: x\npipelines:\n  - {label: a, folder: f, stepz: [1]}\n")
    with pytest.raises(ConfigError, match=r"'pipelines\[0\].stepz' \(in recipe .*typo.yaml'\); did you mean 'pipelines\[0\].steps'"):
        load_suite(tmp_path / "typo.yaml")
    (tmp_path / "broken.yaml").write_text("name: x\npipelines:\n  - label: a\n   folder: [f\n")
    with pytest.raises(ConfigError, match=r"(?s)broken.yaml' is not valid YAML.*line 4"):
        load_suite(tmp_path / "broken.yaml")
    (tmp_path / "empty.yaml").write_text("name: x\npipelines: []\n")
    with pytest.raises(ConfigError, match=r"empty.yaml.*non-empty 'pipelines'"):
        load_suite(tmp_path / "empty.yaml")
    one = load_suite("benchmarks/suites/digits.yaml", ["metrics=digits,fid", "pipelines.0.guidance=2.5"])
    assert one.metrics == ["digits", "fid"] and one.pipelines[0].guidance == 2.5 and one.pipelines[1].guidance == 3


def test_unknown_metric_lists_the_available_ones():
    suite = suite_from_dict({"name": "x", "samples": 12, "metrics": ["digits", "fidd"], "pipelines": [{"label": "a", "folder": "f"}]})
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) fidd; available: clip, digits, digits_reward, fid, hf_energy, hps"):
        build_metrics(suite, load_prompt_set(suite))
    assert main(["bench", "quality", "--pipeline", "a=digits-sd", "--metrics", "bogus", "--samples", "6"]) == 2


def test_missing_metric_weights_name_the_expected_file(tmp_path, capsys):
    base = {"name": "x", "samples": 6, "pipelines": [{"label": "a", "folder": "f"}]}
    suite = suite_from_dict({**base, "metrics": ["fid"], "fid_reference": str(tmp_path), "inception_weights": str(tmp_path / "w.pth")})
    with pytest.raises(Exception, match="weights-inception-2015-12-05-6726825d.pth"):
        build_metrics(suite, load_prompt_set(Suite(**{**suite.__dict__, "metrics": []})))
    suite = suite_from_dict({**base, "metrics": ["hps"], "hps_checkpoint": str(tmp_path / "hps")})
    with pytest.raises(Exception, match="HPS_v2.1_compressed.pt") as e:
        build_metrics(suite, load_prompt_set(suite))
    assert "xswu/HPSv2" in str(e.value)
    suite = suite_from_dict({**base, "metrics": ["clip"], "clip_model": str(tmp_path / "clip")})
    with pytest.raises(Exception, match="clip-vit-large-patch14|model.safetensors"):
        build_metrics(suite, load_prompt_set(suite))
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    rc = main(["bench", "score", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), "--metrics", "clip"])
    assert rc == 2 and "3 prompts but" in capsys.readouterr().err


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path, capsys):
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "notapipe" / "weights.bin").write_bytes(b"x")
    rc = main(["bench", "quality", "--pipeline", f"x={tmp_path / 'notapipe'}", "--samples", "6", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a diffusers pipeline folder" in err
    rc = main(["bench", "speed", "--pipeline", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "out")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_bench_run_writes_quality_speed_and_plots_with_protocol(tiny_sd, tmp_path):
    out = tmp_path / "results"
    rc = main(["bench", "run", "--pipeline", f"teacher={tiny_sd}:steps=6:guidance=3:height=32",
               "--pipeline", f"student={tiny_sd}:steps=1,2:guidance=1:height=32", "--samples", "24", "--seed", "5",
               "--repeats", "2", "--warmup", "1", "--ratio", "teacher@6", "student@2", "--name", "tiny", "--out", str(out)])
    assert rc == 0
    q = json.loads((out / "tiny.json").read_text())
    assert [(r["method"], r["steps"]) for r in q["rows"]] == [("teacher", 6), ("student", 1), ("student", 2)]
    assert all(0 <= r["digit_accuracy"] <= 1 and r["digits_fid"] > 0 and r["samples"] == 24 for r in q["rows"])
    proto = q["protocol"]
    assert proto["seed"] == 5 and len(proto["prompts_sha256_16"]) == 16 and proto["fastgen_commit"]
    digits = proto["metrics"]["digits"]
    assert digits["backend"] == "torchmetrics-custom:digits-classifier" and digits["preprocess"]["resize_filter"] == "box"
    assert digits["torchmetrics"] and digits["real_vs_real_fid_floor"] > 0
    s = json.loads((out / "sampling_speed.json").read_text())
    keys = {"pipeline", "steps", "guidance", "latency_s_median", "latency_s_p90", "images_per_s", "peak_mem_mb", "device", "scope"}
    assert {(r["pipeline"], r["steps"], r["scope"]) for r in s["rows"]} == {
        (p, n, sc) for p, n in (("teacher", 6), ("student", 1), ("student", 2)) for sc in ("end_to_end", "network")}
    assert all(keys <= set(r) for r in s["rows"])
    teacher = {r["scope"]: r for r in s["rows"] if r["pipeline"] == "teacher"}
    assert teacher["network"]["network_evals"] == 6 and teacher["network"]["network_batch"] == 2
    ratio = s["ratios"]["teacher@6 / student@2 (end_to_end)"]
    assert ratio > 1.0
    b = s["ratio_breakdown"]
    assert b["ideal_ratio_by_evaluations"] == 6.0 and b["numerator"]["image_evaluations"] == 12
    assert "Breakdown of teacher@6 / student@2" in (out / "sampling_speed.md").read_text()
    for name in ("tiny.md", "tiny_vs_steps.png", "tiny_vs_latency.png", "sampling_speed.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| teacher | 6 |" in (out / "tiny.md").read_text()
    # the same seed and prompts give the same numbers: the protocol is reproducible
    rc = main(["bench", "quality", "--pipeline", f"student={tiny_sd}:steps=2:guidance=1:height=32", "--samples", "24",
               "--seed", "5", "--name", "again", "--out", str(out)])
    again = json.loads((out / "again.json").read_text())["rows"][0]
    assert again["digits_fid"] == q["rows"][2]["digits_fid"]


def test_only_re_measures_some_rows_and_keeps_the_others(tiny_sd, tmp_path, capsys):
    out = tmp_path / "results"
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "two", "samples": 12, "seed": 3, "batch_size": 12, "pipelines": [
        {"label": "teacher", "folder": str(tiny_sd), "steps": [4], "guidance": 3, "height": 32},
        {"label": "student", "folder": str(tiny_sd), "steps": [1, 2], "guidance": 1, "height": 32}]}))
    assert main(["bench", "quality", str(suite), "--out", str(out)]) == 0
    first = json.loads((out / "two.json").read_text())
    assert main(["bench", "quality", str(suite), "--out", str(out), "only=student", "pipelines.1.guidance=2"]) == 0
    merged = json.loads((out / "two.json").read_text())
    assert [(r["method"], r["steps"]) for r in merged["rows"]] == [("teacher", 4), ("student", 1), ("student", 2)]
    assert merged["rows"][0] == first["rows"][0]  # kept as measured
    assert [r["guidance"] for r in merged["rows"][1:]] == [2, 2] and merged["rows"][2] != first["rows"][2]
    assert merged["protocol"]["merged"] == "re-measured: student"
    assert set(merged["protocol"]["pipelines"]) == {"teacher", "student"}
    capsys.readouterr()
    assert main(["bench", "quality", str(suite), "--out", str(out), "only=student", "seed=4"]) != 0
    assert "the protocol differs in ['seed']" in capsys.readouterr().err
    assert main(["bench", "quality", str(suite), "--out", str(out), "only=nobody"]) != 0
    assert "only=['nobody'] names no pipeline" in capsys.readouterr().err
    assert json.loads((out / "two.json").read_text()) == merged  # refused runs leave the results as they were


def test_recipe_pipelines_are_trained_once_then_reused(tmp_path, monkeypatch, tiny_sd):
    from fastgen.workflows import bench

    calls = []

    def fake_train(recipe, overrides, resume=None):
        from fastgen.config import save_config
        from fastgen.trainers.engine.run import load_run_config

        calls.append((recipe, resume, overrides[:-1]))
        cfg, _ = load_run_config(recipe, overrides)
        run = Path(cfg.output_dir)
        (run / "checkpoints" / "step-1").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text("step-1")
        (run / "checkpoints" / "step-1" / "trainer_state.json").write_text(json.dumps({"step": cfg.train.max_steps}))
        save_config(cfg, run / "config.yaml", header={"method": "lcd"})
        return run

    def fake_export(run_dir, out, overwrite=False):
        out.mkdir(parents=True, exist_ok=True)
        (out / "fastgen_export.json").write_text(json.dumps({"guidance_scale": 2.5, "resolution": 32}))
        return out

    monkeypatch.setattr(bench, "train", fake_train)
    monkeypatch.setattr(bench, "export_run", fake_export)
    spec = bench.PipelineSpec("s", recipe="lcd-digits", steps=[1])
    folder, d = bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    assert calls == [("lcd-digits", None, [])] and d["guidance"] == 2.5 and d["height"] == 32
    bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    assert len(calls) == 1  # finished run reused
    spec = bench.PipelineSpec("big", recipe="lcd-digits", overrides=["lcd.w_max=6"], run_name="lcd-big")
    folder, _ = bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    assert calls[-1] == ("lcd-digits", None, ["lcd.w_max=6"]) and folder == tmp_path / "exports" / "lcd-big"
    # a finished run is never reused for another configuration
    spec = bench.PipelineSpec("other", recipe="lcd-digits", overrides=["lcd.w_max=5"], run_name="lcd-big")
    with pytest.raises(ConfigError, match=r"different configuration .* lcd\.w_max"):
        bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    # ... but a run that differs only in how it was watched (progress bar, logging) is reused
    spec = bench.PipelineSpec("quiet", recipe="lcd-digits", overrides=["lcd.w_max=6", "train.progress=false"], run_name="lcd-big")
    n_calls = len(calls)
    bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    assert len(calls) == n_calls
    # a run extended at a resume (max_steps, recorded in config-changes.jsonl) is the longer recipe's run
    run = tmp_path / "lcd-big"
    (run / "config-changes.jsonl").write_text(json.dumps({"step": 400, "checkpoint": "step-1", "key": "train.max_steps",
                                                          "old": 400, "new": 600, "reason": "free"}) + "\n")
    spec = bench.PipelineSpec("long", recipe="lcd-digits", overrides=["lcd.w_max=6", "train.max_steps=600"], run_name="lcd-big")
    assert not bench._finished(run)  # the latest checkpoint is at 400 of 600 now
    (run / "checkpoints" / "step-1" / "trainer_state.json").write_text(json.dumps({"step": 600}))
    bench.resolve_pipeline(spec, tmp_path, log=lambda *_: None)
    assert len(calls) == n_calls
    # the quality protocol names a recipe pipeline's recipe and its run's configuration
    resolved = bench.recipe_resolver(tmp_path, log=lambda *_: None)(bench.PipelineSpec("s", recipe="lcd-digits"))
    assert resolved.info["recipe"] == "lcd-digits" and resolved.info["run_config"]["method"] == "lcd"
    assert len(calls) == 2
    # the evaluation alone never trains: a recipe pipeline needs its export folder
    from fastgen.evaluation.bench import resolve_folder

    with pytest.raises(ConfigError, match="train and export it first"):
        resolve_folder(bench.PipelineSpec("s", recipe="lcd-digits"))


def test_evaluation_imports_neither_trainers_nor_workflows():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, fastgen.evaluation as e, fastgen.rewards\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('fastgen.evaluation.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('fastgen.trainers', 'fastgen.workflows'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ratio_breakdown_explains_the_gap_to_the_evaluation_ratio():
    from fastgen.evaluation.bench import explain_breakdown, ratio_breakdown

    def row(p, n, scope, lat, evals, batch):
        return {"pipeline": p, "steps": n, "scope": scope, "latency_s_median": lat, "network_evals": evals, "network_batch": batch}

    rows = [row("t", 50, "network", 0.50, 50, 2), row("t", 50, "end_to_end", 0.52, 50, 2),
            row("s", 4, "network", 0.028, 4, 1), row("s", 4, "end_to_end", 0.048, 4, 1)]
    b = ratio_breakdown(rows, ("t", 50), ("s", 4))
    assert b["ideal_ratio_by_evaluations"] == 25.0 and b["ratio_of_forward_counts"] == 12.5
    assert b["numerator"]["ms_per_forward"] == 10.0 and b["denominator"]["ms_per_forward"] == 7.0
    assert b["forward_cost_ratio"] == pytest.approx(10 / 7, abs=1e-3)
    assert b["denominator"]["ms_outside_denoiser"] == pytest.approx(20.0)
    text = explain_breakdown(b)
    assert "25x" in text and "17.9x" in text
    assert ratio_breakdown(rows[:2], ("t", 50), ("s", 4)) == {}


def test_demo_trains_exports_reloads_and_scores_the_student(tiny_sd, tmp_path, monkeypatch, capsys):
    """`fastgen demo` orchestration (fastgen.workflows.demo) with the teachers' check, the training and the
    export replaced by stand-ins; the tiny pipeline plays teacher and exported student. The teacher is
    sampled once: its row in the student table is scored from the images of the teachers' step."""
    import torch

    import fastgen.evaluation.bench as ebench
    import fastgen.workflows.export
    import fastgen.workflows.train
    import fastgen.zoo.check
    from fastgen.workflows.demo import DEMO_TABLE_SAMPLES, run_demo
    from fastgen.zoo import paths

    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "sd-digits").symlink_to(tiny_sd)
    (root / "flux-digits").mkdir()
    (root / "classifier").symlink_to(paths.classifier())
    calls = []

    def fake_check(samples, steps, out_dir, root, name, seed, progress=True, keep_images=False, note=""):
        calls.append(("check", samples, steps))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.md").write_text(f"# teachers\n{note}\n")
        g = torch.Generator().manual_seed(seed)
        images = {"unet_teacher": torch.rand(samples, 3, 32, 32, generator=g),
                  "dit_teacher": torch.rand(samples, 3, 64, 64, generator=g)}
        return {"_images": images, "_seconds": {"unet_teacher": 12.3, "dit_teacher": 45.6}} if keep_images else {}

    loaded = []
    real_load = ebench.load_pipeline_for_bench
    monkeypatch.setattr(ebench, "load_pipeline_for_bench", lambda folder, *a, **k: loaded.append(str(folder)) or real_load(folder, *a, **k))
    monkeypatch.setattr(fastgen.zoo.check, "check", fake_check)
    monkeypatch.setattr(fastgen.workflows.train, "train",
                        lambda recipe, overrides, resume=None: calls.append(("train", recipe, overrides, resume)))
    monkeypatch.setattr(fastgen.workflows.export, "export_run",
                        lambda run_dir, out, overwrite=False: calls.append(("export", Path(run_dir).name, overwrite)) or tiny_sd)
    lines = []
    out = run_demo(samples=6, steps=2, out=tmp_path / "demo", root=root, log=lines.append, progress=False)
    assert calls == [("check", 6, 2), ("train", "lcd-digits", [f"output_dir={out / 'lcd-digits'}", "train.eval_every=0",
                                                                 "train.progress=false"], None),
                     ("export", "lcd-digits", True)]
    q = json.loads((out / "demo_quality.json").read_text())
    assert [(r["method"], r["steps"]) for r in q["rows"]] == [("teacher", 2), ("lcd", 1), ("lcd", 2), ("lcd", 4)]
    teacher = q["rows"][0]
    assert teacher["seconds"] == 12.3 and teacher["samples"] == 6  # the teachers' step's images, not sampled again
    assert loaded == [str(tiny_sd)]  # only the student was loaded for the table
    assert "reused" in q["protocol"]["pipelines"]["teacher"]["images"]
    assert (out / "lcd_student_4step_grid.png").stat().st_size > 0 and (out / "demo_quality.md").is_file()
    assert "A first look" in (out / "demo_quality.md").read_text() and "`make bench`" in (out / "demo_quality.md").read_text()
    assert lines[:2] == ["== fastgen demo: the digits world ==", "Shipped teachers (stock diffusers pipeline folders):"]
    assert any(line.startswith("reloaded with stock diffusers: StableDiffusionPipeline") for line in lines)
    assert lines[-1].startswith("demo finished in")
    # more samples than the demo's tables take: capped, and the tables say so
    lines.clear()
    run_demo(samples=DEMO_TABLE_SAMPLES + 100, steps=2, out=tmp_path / "d3", root=root, log=lines.append, skip_students=True)
    assert calls[-1] == ("check", DEMO_TABLE_SAMPLES, 2)
    assert f"capped from {DEMO_TABLE_SAMPLES + 100}" in (tmp_path / "d3" / "digits_teachers.md").read_text()
    # the command line: same flags, teachers only
    capsys.readouterr()
    assert main(["demo", "--skip-students", "--samples", "6", "--steps", "2", "--out", str(tmp_path / "d2"),
                 "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] Sampling both teachers (2 steps, CFG) and scoring 6 images each..." in printed
    assert "teachers done in" in printed and "[2/2]" not in printed and calls[-1] == ("check", 6, 2)


def test_sampling_and_scoring_show_progress_on_stderr_only(tiny_sd, tmp_path, capsys):
    """Bars (images done / total, images/s) go to stderr, move within a pipeline call, and switch off."""
    from fastgen.evaluation.bench import load_pipeline_for_bench, sample_pipeline
    from fastgen.pipelines.sampling import ImageProgress

    pipe = load_pipeline_for_bench(tiny_sd)
    capsys.readouterr()
    images = sample_pipeline(pipe, ["a red handwritten digit seven"] * 5, 3, 1.0, 0, batch_size=2, height=32, desc="tiny@3")
    got = capsys.readouterr()
    assert images.shape == (5, 3, 32, 32) and got.out == ""
    assert "tiny@3" in got.err and "5/5 img" in got.err and "img/s" in got.err
    # within one call the bar follows the denoising steps (diffusers' callback_on_step_end)
    seen = []
    with ImageProgress(4, "steps") as bar:
        kw = bar.call_kwargs(pipe, 4, 2)
        inner = kw["callback_on_step_end"]
        kw["callback_on_step_end"] = lambda *a: (inner(*a), seen.append(bar.bar.n))[0]
        pipe(["a"] * 4, num_inference_steps=2, guidance_scale=1.0, output_type="pt", height=32, width=32, **kw)
    assert seen == [2.0, 4.0]
    capsys.readouterr()
    again = sample_pipeline(pipe, ["a red handwritten digit seven"] * 5, 3, 1.0, 0, batch_size=2, height=32, progress=False)
    assert torch_equal(again, images) and capsys.readouterr().err == ""
    # `fastgen bench quality`: bars on stderr, the table on stdout; the suite key progress=false turns them off
    suite = tmp_path / "tiny.yaml"
    suite.write_text(f"name: tiny\nsamples: 6\npipelines:\n  - {{label: s, folder: {tiny_sd}, steps: [1], guidance: 1, height: 32}}\n")
    args = ["bench", "quality", str(suite), "--out", str(tmp_path)]
    assert main(args) == 0
    got = capsys.readouterr()
    assert "s@1" in got.err and "6/6 img" in got.err and "img/s" not in got.out
    assert main([*args, "progress=false"]) == 0
    assert "img/s" not in capsys.readouterr().err


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
