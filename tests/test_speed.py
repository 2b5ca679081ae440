"""fastgen.evaluation.speed on a tiny Stable Diffusion pipeline and on hand-made fake pipelines, and
the CPU smoke path of benchmarks/gpu/sd15_speed.py."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastgen.errors import ConfigError
from fastgen.evaluation.speed import SPEED_COLUMNS, denoiser_of, measure_pipeline_speed, speed_ratio

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "sd15_speed.py"
PROMPT = "a photo of a cat sitting on a red sofa"


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from tiny_models import make_tiny_sd

    folder = make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CountingPipe:
    """Wraps a pipeline: records every call's keyword arguments and how many forward pre-hooks the
    denoiser had at that moment; everything else is the wrapped pipeline's."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        den = denoiser_of(self._pipe)
        self.calls.append({"kwargs": kwargs, "pre_hooks": len(den._forward_pre_hooks), "hooks": len(den._forward_hooks)})
        return self._pipe(**kwargs)


# --------------------------------------------------------------------------- tiny Stable Diffusion


def test_rows_for_both_scopes(sd_pipe):
    rows = measure_pipeline_speed(sd_pipe, label="tiny-sd", prompt=PROMPT, steps=4, guidance=7.5, warmup=1, repeats=3)
    assert [r["scope"] for r in rows] == ["end_to_end", "network"]
    e2e, net = rows
    for r in rows:
        assert set(SPEED_COLUMNS) <= set(r)
        assert r["pipeline"] == "tiny-sd" and r["steps"] == 4 and r["guidance"] == 7.5
        assert len(r["latency_s_all"]) == 3 and all(x > 0 for x in r["latency_s_all"])
        assert min(r["latency_s_all"]) <= r["latency_s_median"] <= r["latency_s_p90"] <= max(r["latency_s_all"])
        assert r["images_per_s"] == pytest.approx(1 / r["latency_s_median"])
        assert r["peak_mem_kind"] == "cpu_peak_rss" and r["peak_mem_mb"] > 0
        assert r["device"] == f"cpu ({torch.get_num_threads()} threads)"
        assert r["dtype"] == "float32" and r["attention_backend"] == "AttnProcessor2_0"
        assert r["compile_mode"] == "none" and r["warmup"] == 1 and r["repeats"] == 3
        assert (r["height"], r["width"], r["resolution"]) == (16, 16, "16x16")  # read from the output
        # SD's classifier-free guidance: one forward per step on the doubled batch
        assert r["network_evals"] == 4 and r["network_batch"] == 2
        assert r["torch"] == torch.__version__
    # the forwards are part of their calls (timed in the same calls, so robust on a busy machine)
    assert net["latency_s_median"] < net["call_s_median"] and all(x >= 0 for x in net["outside_denoiser_s_all"])


@pytest.mark.parametrize("guidance, batch, expected", [(7.5, 2, 4), (1.0, 2, 2), (1.0, 1, 1)])
def test_network_batch_follows_cfg(sd_pipe, guidance, batch, expected):
    (row,) = measure_pipeline_speed(
        sd_pipe, label="b", prompt=PROMPT, steps=3, guidance=guidance, batch_size=batch, warmup=0, repeats=1, scopes=("network",)
    )
    assert row["network_evals"] == 3
    assert row["network_batch"] == expected
    assert row["images_per_s"] == pytest.approx(batch / row["latency_s_median"])


def test_latency_grows_with_steps(sd_pipe):
    kw = dict(label="tiny-sd", prompt=PROMPT, guidance=7.5, warmup=1, repeats=3)
    short = {r["scope"]: r for r in measure_pipeline_speed(sd_pipe, steps=2, **kw)}
    long = {r["scope"]: r for r in measure_pipeline_speed(sd_pipe, steps=20, **kw)}
    # 10x the forwards: the denoiser time must grow by well over 3x, the whole call clearly too
    assert long["network"]["latency_s_median"] > 3 * short["network"]["latency_s_median"]
    assert long["end_to_end"]["latency_s_median"] > 1.5 * short["end_to_end"]["latency_s_median"]
    assert long["network"]["network_evals"] == 20 and short["network"]["network_evals"] == 2


def test_call_count_hooks_and_seed(sd_pipe):
    den = sd_pipe.unet
    user_calls = []
    user_hook = den.register_forward_hook(lambda m, a, o: user_calls.append(1))
    try:
        before_pre, before_post = dict(den._forward_pre_hooks), dict(den._forward_hooks)

        pipe = CountingPipe(sd_pipe)
        measure_pipeline_speed(pipe, label="c", prompt=PROMPT, steps=2, guidance=7.5, warmup=2, repeats=3, seed=123,
                               scopes=("end_to_end",))
        assert len(pipe.calls) == 2 + 3
        # warm-up calls carry the forward counters, timed end-to-end calls run with no extra hook
        assert [c["pre_hooks"] for c in pipe.calls] == [1, 1, 0, 0, 0]
        for c in pipe.calls:
            kw = c["kwargs"]
            assert kw["generator"].initial_seed() == 123 and kw["generator"].device.type == "cpu"
            assert kw["output_type"] == "pt" and kw["num_inference_steps"] == 2 and kw["guidance_scale"] == 7.5
            assert kw["prompt"] == [PROMPT]
        assert len({id(c["kwargs"]["generator"]) for c in pipe.calls}) == 5  # a fresh generator per call

        pipe = CountingPipe(sd_pipe)
        measure_pipeline_speed(pipe, label="c", prompt=PROMPT, steps=2, guidance=7.5, warmup=1, repeats=2)
        assert len(pipe.calls) == 1 + 2 * 2
        assert [c["pre_hooks"] for c in pipe.calls] == [1, 0, 0, 1, 1]

        assert dict(den._forward_pre_hooks) == before_pre
        assert dict(den._forward_hooks) == before_post
        assert len(user_calls) == 2 * (5 + 5)  # the user's hook kept working throughout
    finally:
        user_hook.remove()
    assert not den._forward_hooks and not den._forward_pre_hooks
    assert getattr(sd_pipe, "_progress_bar_config", {}).get("disable") is True  # restored, not dropped


def test_call_kwargs_override_and_size(sd_pipe):
    pipe = CountingPipe(sd_pipe)
    (row,) = measure_pipeline_speed(pipe, label="k", prompt=PROMPT, steps=1, guidance=1.0, height=24, width=32, warmup=0,
                                    repeats=1, scopes=("end_to_end",), call_kwargs={"negative_prompt": ["ugly"]},
                                    compile_mode="max-autotune")
    kw = pipe.calls[0]["kwargs"]
    assert kw["negative_prompt"] == ["ugly"] and (kw["height"], kw["width"]) == (24, 32)
    assert row["resolution"] == "24x32" and row["compile_mode"] == "max-autotune"


def test_bad_arguments(sd_pipe):
    kw = dict(label="x", prompt=PROMPT, steps=2, guidance=7.5)
    with pytest.raises(ConfigError, match="repeats"):
        measure_pipeline_speed(sd_pipe, repeats=0, **kw)
    with pytest.raises(ConfigError, match="warmup"):
        measure_pipeline_speed(sd_pipe, warmup=-1, **kw)
    with pytest.raises(ConfigError, match="end_to_end.*network"):
        measure_pipeline_speed(sd_pipe, scopes=("end_to_end", "vae"), **kw)
    with pytest.raises(ConfigError, match="steps"):
        measure_pipeline_speed(sd_pipe, label="x", prompt=PROMPT, steps=0, guidance=1.0)
    no_denoiser = SimpleNamespace(vae=torch.nn.Linear(2, 2), components={"vae": torch.nn.Linear(2, 2), "tokenizer": None})
    with pytest.raises(ConfigError, match="unet.*transformer.*vae=Linear"):
        denoiser_of(no_denoiser)
    with pytest.raises(ConfigError):
        measure_pipeline_speed(no_denoiser, **kw)


# --------------------------------------------------------------------------- fake pipelines


class KeywordDenoiser(torch.nn.Module):
    """A stand-in transformer taking its latents as ``hidden_states=`` (as diffusers transformers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep=None):
        return self.proj(hidden_states)


class FakeTransformerPipe:
    """A Flux-like pipeline: ``pipe.transformer`` called by keyword, twice per step (true CFG), with a
    large temporary allocation during each call."""

    def __init__(self, alloc_mb: int = 0, sleep_s: float = 0.0) -> None:
        self.transformer = KeywordDenoiser()
        self.alloc_mb = alloc_mb
        self.sleep_s = sleep_s

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, output_type, height=32, width=32):
        big = torch.ones(self.alloc_mb * 2**18) if self.alloc_mb else None  # float32: 4 bytes each
        for _ in range(num_inference_steps):
            for _ in range(2):
                self.transformer(hidden_states=torch.zeros(len(prompt), 5, 8), timestep=torch.ones(len(prompt) + 7))
        time.sleep(self.sleep_s)
        del big
        return SimpleNamespace(images=torch.zeros(len(prompt), 3, height, width))


def test_transformer_pipeline_two_forwards_per_step():
    pipe = FakeTransformerPipe()
    assert denoiser_of(pipe) is pipe.transformer
    rows = measure_pipeline_speed(pipe, label="flux-like", prompt="p", steps=3, guidance=3.5, batch_size=3, warmup=0, repeats=2)
    for r in rows:
        assert r["network_evals"] == 6 and r["network_batch"] == 3
        assert r["attention_backend"] == "unknown"
        assert r["resolution"] == "32x32"


def test_peak_rss_sees_a_transient_allocation():
    (row,) = measure_pipeline_speed(FakeTransformerPipe(alloc_mb=160, sleep_s=0.05), label="alloc", prompt="p", steps=1,
                                    guidance=1.0, warmup=0, repeats=2, scopes=("end_to_end",))
    assert row["peak_mem_kind"] == "cpu_peak_rss"
    assert row["peak_mem_delta_mb"] > 100
    assert row["peak_mem_mb"] >= row["peak_mem_delta_mb"]


def test_compiled_module_is_detected():
    from fastgen.evaluation import speed

    # torch.compile wraps lazily: nothing is compiled until the module is called (never, here)
    assert speed._is_compiled(torch.compile(torch.nn.Linear(2, 2)))
    assert not speed._is_compiled(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- speed_ratio


def _row(label, steps, scope, median):
    return {"pipeline": label, "steps": steps, "scope": scope, "latency_s_median": median}


def test_speed_ratio_on_synthetic_rows():
    rows = [
        _row("teacher", 50, "end_to_end", 2.0),
        _row("teacher", 50, "network", 1.5),
        _row("student", 4, "end_to_end", 0.25),
        _row("student", 4, "network", 0.1),
        _row("student", 1, "end_to_end", 0.1),
    ]
    assert speed_ratio(rows, ("teacher", 50), ("student", 4)) == pytest.approx(8.0)
    assert speed_ratio(rows, ("teacher", 50), ("student", 4), scope="network") == pytest.approx(15.0)
    assert speed_ratio(rows, ("student", 4), ("teacher", 50)) == pytest.approx(0.125)
    assert speed_ratio(rows, ("teacher", 50), ("student", 1)) == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="no speed row"):
        speed_ratio(rows, ("teacher", 50), ("student", 1), scope="network")
    with pytest.raises(ConfigError, match="distinct labels"):
        speed_ratio(rows + [_row("teacher", 50, "end_to_end", 3.0)], ("teacher", 50), ("student", 4))


# --------------------------------------------------------------------------- the GPU benchmark's CPU smoke path


def _load_script():
    spec = importlib.util.spec_from_file_location("sd15_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd15_speed_quick_tiny(tmp_path):
    bench = _load_script()
    out = tmp_path / "quick"
    rc = bench.main(["--quick", "--tiny", "--device", "cpu", "--out", str(out), "--threads", "1", "--student-steps", "0,1,2"])
    assert rc == 0
    data = json.loads((out / "sd15_speed.json").read_text())
    assert (out / "sd15_speed.md").read_text().count("teacher-ddim") >= 2
    assert data["settings"]["compile"] == "skipped" and data["settings"]["resolution"] == "64x64"
    assert data["environment"]["torch"] == torch.__version__

    ok = [r for r in data["rows"] if "error" not in r]
    got = {(r["pipeline"], r["steps"], r["scope"]) for r in ok}
    for scope in ("end_to_end", "network"):
        assert ("teacher-ddim", 4, scope) in got
        assert ("student-lcm", 1, scope) in got and ("student-lcm", 2, scope) in got
    for r in ok:
        assert set(SPEED_COLUMNS) <= set(r) and r["section"] == "eager" and r["latency_s_median"] > 0
        teacher = r["pipeline"] == "teacher-ddim"
        assert r["network_evals"] == r["steps"]
        assert r["network_batch"] == (2 if teacher else 1)

    # the invalid 0-step configuration is recorded as an error and the run went on
    assert any(e["pipeline"] == "student-lcm" and e["steps"] == 0 and "ConfigError" in e["error"] for e in data["errors"])
    ratios = data["ratios"]["eager"]
    for scope in ("end_to_end", "network"):
        assert isinstance(ratios[scope]["teacher_4/student_1"], float) and ratios[scope]["teacher_4/student_1"] > 1
        assert ratios[scope]["teacher_4/student_0"].startswith("unavailable")


# --------------------------------------------------------------------------- honesty: fused LoRA, outside time >= 0

DURATION_KEY = re.compile(r"latency|seconds|(^|_)ms(_|$)|_s(_|$)")


def negative_durations(obj, path="") -> list[str]:
    """Every value under a duration-like key (``latency_s_*``, ``*_s_median``, ``ms_*``, ``seconds``...)
    that is negative, anywhere in a (JSON) structure."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}"
            if DURATION_KEY.search(str(k)):
                values = v if isinstance(v, list) else [v]
                bad += [f"{sub}={x}" for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and x < 0]
            bad += negative_durations(v, sub)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += negative_durations(v, f"{path}[{i}]")
    return bad


class SlowingDenoiser(torch.nn.Module):
    """A denoiser that dominates its pipeline and gets slower with every pipeline call (a machine
    warming up, another job starting): timed in separate calls, the network scope can take longer
    than the end-to-end scope."""

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep=None):
        time.sleep(0.004 * (1 + self.pipe.calls))
        return self.proj(hidden_states)


class SlowingPipe(FakeTransformerPipe):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.transformer = SlowingDenoiser(self)

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.calls += 1


def test_outside_denoiser_time_is_measured_in_the_same_calls_and_never_negative():
    from fastgen.evaluation.bench import explain_breakdown, ratio_breakdown

    rows = []
    for label, steps in (("teacher", 3), ("student", 1)):
        rows += measure_pipeline_speed(SlowingPipe(), label=label, prompt="p", steps=steps, guidance=1.0, warmup=0, repeats=3)
    net = {r["pipeline"]: r for r in rows if r["scope"] == "network"}
    e2e = {r["pipeline"]: r for r in rows if r["scope"] == "end_to_end"}
    assert net["teacher"]["latency_s_median"] > e2e["teacher"]["latency_s_median"]  # separate calls: the naive difference is < 0
    b = ratio_breakdown(rows, ("teacher", 3), ("student", 1))
    assert negative_durations({"rows": rows, "ratio_breakdown": b}) == []
    for side in ("numerator", "denominator"):
        assert b[side]["ms_outside_denoiser"] >= 0 and "same calls" in b[side]["outside_denoiser_measured"]
    assert "measured in the same calls" in explain_breakdown(b)
    for r in net.values():
        # the hooked calls were timed whole too: per call, whole time minus its forwards
        assert len(r["outside_denoiser_s_all"]) == 3 and min(r["outside_denoiser_s_all"]) >= 0
        assert r["call_s_median"] >= r["latency_s_median"]
        assert r["outside_denoiser_s_median"] < 0.5 * r["latency_s_median"]  # the network dominates


def test_breakdown_of_rows_without_paired_times_clamps_and_flags():
    from fastgen.evaluation.bench import explain_breakdown, ratio_breakdown

    def row(p, scope, med, p90):
        return {"pipeline": p, "steps": 4, "scope": scope, "latency_s_median": med, "latency_s_p90": p90,
                "network_evals": 4, "network_batch": 1}

    rows = [row("a", "network", 0.100, 0.104), row("a", "end_to_end", 0.098, 0.101),
            row("b", "network", 0.050, 0.051), row("b", "end_to_end", 0.060, 0.061)]
    b = ratio_breakdown(rows, ("a", 4), ("b", 4))
    assert b["numerator"]["ms_outside_denoiser"] == 0 and b["numerator"]["outside_denoiser_clamped"] is True
    assert b["numerator"]["ms_noise_band"] == pytest.approx(4.0)
    assert b["denominator"]["ms_outside_denoiser"] == pytest.approx(10.0) and "outside_denoiser_clamped" not in b["denominator"]
    assert negative_durations(b) == [] and "shown as 0" in explain_breakdown(b)


def make_tiny_lora_export(base: Path, folder: Path) -> Path:
    """A LoRA export (``pytorch_lora_weights.safetensors`` + ``fastgen_export.json``) on the tiny SD pipeline."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    folder.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    (folder / "fastgen_export.json").write_text(json.dumps({"base_model_path": str(base), "guidance_scale": 1.0,
                                                            "resolution": 16}))
    return folder


def test_lora_students_are_timed_fused_with_the_unfused_row_labelled(tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    import fastgen.evaluation.speed as speed
    from fastgen.cli import main

    from tiny_models import make_tiny_sd

    base = make_tiny_sd(tmp_path / "tiny-sd")
    lora = make_tiny_lora_export(base, tmp_path / "lora-export")
    seen = {}
    real = speed.measure_pipeline_speed

    def spy(pipe, **kw):  # the adapters' state while each label is timed
        layers = [layer for m in (pipe.unet, pipe.text_encoder) for layer in m.modules() if isinstance(layer, BaseTunerLayer)]
        seen[kw["label"]] = {"layers": len(layers), "merged": [bool(layer.merged) for layer in layers]}
        return real(pipe, **kw)

    monkeypatch.setattr(speed, "measure_pipeline_speed", spy)
    out = tmp_path / "out"
    rc = main(["bench", "speed", "--pipeline", f"lcd-lora={lora}:steps=1,2:guidance=1", "--pipeline",
               f"teacher={base}:steps=2:guidance=3", "--repeats", "2", "--warmup", "0", "--ratio", "teacher@2", "lcd-lora@2",
               "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "sampling_speed.json").read_text())
    labels = [(r["pipeline"], r["steps"], r["scope"]) for r in result["rows"]]
    # the fused row is the main one (listed first); the unfused one is kept, labelled
    assert labels[:4] == [("lcd-lora", 1, "end_to_end"), ("lcd-lora", 1, "network"), ("lcd-lora", 2, "end_to_end"),
                          ("lcd-lora", 2, "network")]
    assert {x for x in labels if x[0] == "lcd-lora (unfused)"} == {("lcd-lora (unfused)", n, s) for n in (1, 2)
                                                                 for s in ("end_to_end", "network")}
    fused = seen["lcd-lora"]
    assert fused["layers"] > 0 and all(fused["merged"])  # pipe.fuse_lora() applied: no active layer left unfused
    assert seen["lcd-lora (unfused)"]["layers"] == fused["layers"] and not any(seen["lcd-lora (unfused)"]["merged"])
    for r in result["rows"]:
        if r["pipeline"] == "lcd-lora":
            assert r["lora"] == "fused" and r["lora_layers"] > 0 and r["lora_unfused_layers"] == 0
        elif r["pipeline"] == "lcd-lora (unfused)":
            assert r["lora"] == "unfused" and r["lora_unfused_layers"] == r["lora_layers"] > 0
        else:
            assert r["lora"] == "none"
    assert "fuse_lora" in result["protocol"]["pipelines"]["lcd-lora"]["lora"]
    assert negative_durations(result) == []
    md = (out / "sampling_speed.md").read_text()
    assert "| lcd-lora (unfused) |" in md and "timed fused" in md
