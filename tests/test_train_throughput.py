"""benchmarks/train_throughput.py: the --quick run on the digits teacher (schema, positive throughput)
and the behaviour the comparison rests on: the batched variant runs ONE teacher UNet forward per
step (batch 2B), the separate baseline runs TWO (batch B each), the cached variant no VAE encode and
no text encoder."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-throughput")
    rc = bench.main(["--study", "variants", "--quick", "--teachers", "digits", "--out", str(out), "--threads", "1"])
    return rc, out


def test_quick_run_schema_and_throughput(bench, quick_run):
    rc, out = quick_run
    assert rc == 0
    result = json.loads((out / "train_throughput_variants.json").read_text())
    md = (out / "train_throughput_variants.md").read_text()
    assert "| teacher | mode | variant |" in md

    proto = result["protocol"]
    assert proto["quick"] is True and proto["device"] == "cpu"
    for key in ("torch", "torch_threads", "memory", "step", "timing", "variants"):
        assert proto.get(key) not in (None, ""), key
    assert proto["torch"] == torch.__version__
    assert result["skipped"] == []

    rows = result["rows"]
    assert {(r["mode"], r["variant"]) for r in rows} == {(m, v) for m in ("full", "lora") for v in bench.VARIANTS}
    assert len(rows) == 6
    for r in rows:
        for key in ("teacher", "mode", "variant", "batch", "sec_per_step_median", "samples_per_s", "peak_mem_mb", "device"):
            assert key in r, (key, r)
        assert r["teacher"] == "digits" and r["device"] == "cpu"
        assert isinstance(r["batch"], int) and r["batch"] >= 1
        assert r["sec_per_step_median"] > 0 and math.isfinite(r["sec_per_step_median"])
        assert r["samples_per_s"] > 0 and math.isfinite(r["samples_per_s"])
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["sec_per_step_median"])
        assert isinstance(r["peak_mem_mb"], (int, float)) and r["peak_mem_mb"] >= 0
        assert r["peak_mem_total_mb"] >= r["peak_mem_mb"]
        assert len(r["sec_per_step_all"]) == r["repeats"]
        assert math.isfinite(r["loss_last"])

    comps = {(c["teacher"], c["mode"]): c for c in result["comparisons"]}
    assert set(comps) == {("digits", "full"), ("digits", "lora")}
    for c in comps.values():
        assert c["batched_speedup_over_separate"] > 0 and c["cache_speedup"] > 0


def test_quick_run_counts_teacher_forwards(quick_run):
    """Counted by the benchmark's forward hook on the teacher UNet during the warm-up steps."""
    _, out = quick_run
    rows = json.loads((out / "train_throughput_variants.json").read_text())["rows"]
    by = {(r["mode"], r["variant"]): r for r in rows}
    for mode in ("full", "lora"):
        b = by[(mode, "batched")]["batch"]
        batched, separate, cached = by[(mode, "batched")], by[(mode, "separate")], by[(mode, "cached")]
        for r in (batched, separate, cached):
            assert r["calls_consistent"] is True
        assert batched["teacher_unet_calls_per_step"] == 1
        assert batched["teacher_unet_rows_per_call"] == [2 * b]
        assert separate["teacher_unet_calls_per_step"] == 2
        assert separate["teacher_unet_rows_per_call"] == [b, b]
        assert cached["teacher_unet_calls_per_step"] == 1
        # the cache removes the VAE encode and the text encoder from the step
        assert batched["vae_encoder_calls_per_step"] == 1 and batched["text_encoder_calls_per_step"] >= 1
        assert cached["vae_encoder_calls_per_step"] == 0 and cached["text_encoder_calls_per_step"] == 0
    # full mode: the teacher UNet is its own module (student and target are copies)
    assert by[("full", "batched")]["unet_module_calls_per_step"] == 1
    # LoRA mode: the same UNet is teacher (adapters off), student and target: 1 + 1 + 1 vs 2 + 1 + 1
    assert by[("lora", "batched")]["unet_module_calls_per_step"] == 3
    assert by[("lora", "separate")]["unet_module_calls_per_step"] == 4


def test_separate_baseline_with_own_hook(bench):
    """An independent forward hook on the teacher UNet: one call of 2B rows per step, vs two of B rows
    inside separate_cond_uncond; both give the same teacher prediction; the teacher's setting is restored on exit."""
    from fastgen.models import Teacher
    from fastgen.trainers.lcd import LCD
    from tiny_models import build_method

    torch.set_num_threads(1)
    m = build_method(LCD, teacher="digits-sd", eval_samples=0)
    teacher = m.teacher
    r, b = m.nets.resolution, 3
    batch = {"pixels": torch.rand(b, 3, r, r) * 2 - 1, "caption": ["a red handwritten digit seven"] * b}
    opt = bench.make_optimizer(m)
    sizes: list[int] = []
    handle = teacher.net.register_forward_hook(lambda mod, args, out: sizes.append(int(args[0].shape[0])))
    try:
        bench.train_iteration(m, opt, batch, 0)
        assert sizes == [2 * b]
        sizes.clear()
        with bench.separate_cond_uncond(teacher):
            assert teacher.cfg_forward == "separate"
            bench.train_iteration(m, opt, batch, 1)
        assert sizes == [b, b]
        assert teacher.cfg_forward == "batched" and teacher.predict.__func__ is Teacher.predict

        x = torch.randn(b, *teacher.latent_shape(1, r, r)[1:])
        t = torch.tensor([999, 500, 20])
        cond = teacher.encode_prompt(batch["caption"])
        uncond = teacher.encode_prompt([""])
        w = torch.tensor([6.0, 8.5, 16.0])
        with torch.no_grad():
            ref = teacher.predict(x, t, cond, uncond, guidance=w)
            with bench.separate_cond_uncond(teacher):
                sep = teacher.predict(x, t, cond, uncond, guidance=w)
        # batch 2B vs B changes only float rounding (x0 at t=999 amplifies it by sigma/alpha ~ 15)
        for a, c in zip(ref, sep):
            torch.testing.assert_close(a, c, atol=3e-4, rtol=1e-4)
    finally:
        handle.remove()


def test_sd15_arch_unet_config_is_sd15(bench):
    """The SD1.5-architecture teacher's UNet, built on the meta device (no memory, no compute)."""
    from diffusers import UNet2DConditionModel

    cfg = bench.sd15_unet_config(16)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.layers_per_block == 2 and unet.config.cross_attention_dim == 768
    assert unet.config.attention_head_dim == 8 and unet.config.sample_size == 16
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # stable-diffusion-v1-5's UNet


# --------------------------------------------------------------------------- the GPU step's pieces


def _row(variant, compile_, sec, mem=100.0, teacher="sd15-arch", mode="full"):
    return {"teacher": teacher, "mode": mode, "variant": variant, "compile": compile_, "sec_per_step_median": sec,
            "peak_mem_mb": mem}


def test_comparisons_per_compile_section(bench):
    rows = [_row("batched", "none", 1.0), _row("separate", "none", 1.5, 120.0),
            _row("batched", "inductor/default", 0.5), _row("separate", "inductor/default", 0.8)]
    comps = {c["compile"]: c for c in bench.comparisons(rows)}
    assert set(comps) == {"none", "inductor/default"}
    assert comps["none"]["batched_speedup_over_separate"] == pytest.approx(1.5)
    assert comps["none"]["peak_mem_batched_over_separate"] == pytest.approx(100 / 120)
    assert "compile_speedup_batched" not in comps["none"]
    assert comps["inductor/default"]["batched_speedup_over_separate"] == pytest.approx(1.6)
    assert comps["inductor/default"]["compile_speedup_batched"] == pytest.approx(2.0)
    # rows of the earlier format (no compile key) are the eager section
    old = [{k: v for k, v in r.items() if k != "compile"} for r in rows[:2]]
    assert bench.comparisons(old)[0]["compile"] == "none"


def test_budget_spent_before_anything_starts(bench, tmp_path):
    """--budget-s: nothing starts after the budget; the results (empty, with the reasons) are still written."""
    rc = bench.main(["--study", "variants", "--teachers", "digits,sd15-arch", "--modes", "full", "--tiny", "--budget-s", "1e-9",
                     "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "train_throughput_variants.json").read_text())
    assert result["rows"] == []
    assert [(s["teacher"], s["mode"]) for s in result["skipped"]] == [("digits", "full"), ("sd15-arch-mini", "full")]
    assert all("time budget" in s["reason"] for s in result["skipped"])
    assert result["protocol"]["budget_s"] == 1e-9 and "Skipped or failed" in (tmp_path / "train_throughput_variants.md").read_text()


def test_worker_past_the_deadline_is_stopped(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEADLINE_GRACE_S", 0.0)
    rc, result = bench._run_child({"job": "measure"}, tmp_path, "late", deadline=time.time() - 1)
    assert rc == bench.RC_DEADLINE and result is None
    assert "time budget" in bench._rc_reason(rc)


def test_run_config_deadline_skips_and_writes_partial(bench, tmp_path):
    """A worker whose deadline has passed measures nothing, lists every variant as skipped and leaves that
    in its partial result (what the orchestrator reads when it has to stop a worker)."""
    from fastgen.zoo.paths import resolve_model

    partial = tmp_path / "x.partial.json"
    spec = {"teacher": "digits", "folder": str(resolve_model("digits-sd")), "mode": "full", "batch": 2, "warmup": 1,
            "repeats": 1, "device": "cpu", "teacher_dtype": "float32", "pool_batches": 1, "work_dir": str(tmp_path),
            "threads": 1, "variants": ["batched", "separate"], "compile": "both", "deadline": time.time() - 1}
    result = bench.run_config(spec, partial=partial)
    assert result["rows"] == []
    assert [(s["variant"], s["compile"]) for s in result["skipped"]] == [
        ("batched", "none"), ("separate", "none"), ("batched", "inductor/default"), ("separate", "inductor/default")]
    assert json.loads(partial.read_text())["skipped"] == result["skipped"]


def test_compiled_networks_and_bf16_autocast_step(bench):
    """compile_networks compiles the teacher UNet, the student and the EMA target in place (backend eager:
    dynamo's tracing without code generation); the step runs under bf16 autocast with a finite loss and the
    float32 student gets float32 gradients."""
    from fastgen.trainers.lcd import LCD
    from tiny_models import build_method

    torch.set_num_threads(1)
    m = build_method(LCD, teacher="digits-sd", eval_samples=0)
    r, b = m.nets.resolution, 2
    batch = {"pixels": torch.rand(b, 3, r, r) * 2 - 1, "caption": ["a red handwritten digit seven"] * b}
    names = bench.compile_networks(m, backend="eager")
    assert names == ["teacher.net", "student", "target"]
    for mod in (m.teacher.net, m.nets.student, m.nets.target):
        assert getattr(mod, "_compiled_call_impl", None) is not None
    opt = bench.make_optimizer(m)
    try:
        loss = bench.train_iteration(m, opt, batch, 0, autocast="bf16")
    finally:
        torch._dynamo.reset()
    assert math.isfinite(loss)
    grads = [p.grad for p in m.nets.student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    with bench.autocast_context(m.teacher.device, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert isinstance(bench.autocast_context("cpu", None), contextlib.nullcontext)
