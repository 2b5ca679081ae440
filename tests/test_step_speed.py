"""The training step's speed options keep its maths: the teacher's guidance as one batched forward or
two separate ones, channels-last networks, torch.compile of the step networks (traced without graph
breaks; samples and evaluation run them eagerly), fused AdamW, the 8-bit AdamW's missing-package
error, and the ``--study ladder`` of benchmarks/train_throughput.py (reference step against the
optimised one, side by side)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fastgen.errors import ConfigError
from fastgen.trainers.engine import speed
from fastgen.trainers.engine.optim import OptimizerSpec, build_optimizer, resolve_spec
from fastgen.trainers.engine.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red handwritten digit seven"


def _lcd(**options):
    from fastgen.trainers.lcd import LCD
    from tiny_models import build_method

    return build_method(LCD, teacher="digits-sd", eval_samples=0, **options)


def _batch(method, b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = method.nets.resolution
    return {"pixels": torch.rand(b, 3, r, r, generator=g) * 2 - 1, "caption": [CAPTION] * b}


def _loss(method, batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return method.train_step(batch, 0).losses["student"]


def test_separate_cfg_forwards_equal_the_batched_one():
    """teacher.cfg_forward: two forwards of batch B give the batched [uncond; cond] forward's (x0, eps)."""
    m = _lcd()
    teacher = m.teacher
    torch.manual_seed(0)
    x = torch.randn(3, *teacher.latent_shape(1, m.nets.resolution, m.nets.resolution)[1:])
    t = torch.tensor([100, 500, 900])
    cond, uncond = teacher.encode_prompt([CAPTION] * 3), teacher.encode_prompt([""])
    w = torch.tensor([1.5, 3.0, 6.0])
    with torch.no_grad():
        batched = teacher.predict(x, t, cond, uncond, w)
        teacher.cfg_forward = "separate"
        separate = teacher.predict(x, t, cond, uncond, w)
    # Batch 6 and batch 3 take different convolution kernels, so the network outputs differ by float32
    # round-off (~3e-6), which guidance at w = 6 multiplies by up to 2w - 1 = 11; a swapped or misrouted
    # branch would differ by O(1).
    for a, b in zip(batched, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # and it is really a different call pattern: two network calls of batch 3 instead of one of 6
    rows = []
    handle = teacher.net.register_forward_hook(lambda mod, args, out: rows.append(int(args[0].shape[0])))
    try:
        with torch.no_grad():
            teacher.predict(x, t, cond, uncond, w)
            teacher.cfg_forward = "batched"
            teacher.predict(x, t, cond, uncond, w)
    finally:
        handle.remove()
    assert rows == [3, 3, 6]


def test_cfg_forward_reaches_the_teacher_from_the_recipe():
    m = _lcd(sections={"teacher": {"cfg_forward": "separate"}})
    assert m.teacher.cfg_forward == "separate"
    with pytest.raises(ConfigError, match="cfg_forward"):
        _lcd(sections={"teacher": {"cfg_forward": "twice"}})


def test_step_networks_and_constant_teacher():
    full, lora = _lcd(), _lcd(lora=True, lora_rank=2)
    assert list(full.step_networks()) == ["nets.teacher.net", "nets.student", "nets.target"]
    assert full.constant_networks() == ("nets.teacher.net",)
    # LoRA: the teacher's UNet is also the student (its adapters train), so nothing is constant
    assert list(lora.step_networks()) == ["nets.teacher.net"] and lora.constant_networks() == ()


def test_channels_last_keeps_the_step():
    m = _lcd()
    batch = _batch(m)
    ref = _loss(m, batch)
    names = speed.apply_channels_last(m)
    assert names == ["nets.teacher.net", "nets.student", "nets.target"]
    conv = next(mod for mod in m.nets.student.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert float((_loss(m, batch) - ref).abs().detach()) <= 1e-5 * max(1.0, float(ref.abs().detach()))


def test_compiled_step_has_no_graph_breaks_and_samples_eagerly():
    """Dynamo traces the teacher, student and target of the LCD step in one graph each (backend eager:
    tracing without code generation), the loss is the eager step's, and inside speed.eager() a new
    sampling shape compiles nothing."""
    torch._dynamo.reset()
    m = _lcd()
    batch = _batch(m)
    ref = _loss(m, batch)
    before = speed.compile_counters()
    try:
        done = speed.compile_step_networks(m, backend="eager")
        assert done == {"nets.teacher.net": "eager", "nets.student": "eager", "nets.target": "eager"}
        loss = _loss(m, batch)
        after_step = speed.compile_counters()
        assert after_step["graph_breaks"] == before["graph_breaks"]
        assert after_step["graphs"] - before["graphs"] == 3  # teacher, student, target: one graph each
        assert float((loss - ref).abs()) <= 1e-5 * max(1.0, float(ref.abs()))
        _loss(m, _batch(m, seed=1), seed=1)  # another batch and draw: the same graphs, no recompilation
        assert speed.compile_counters()["graphs"] == after_step["graphs"]
        with speed.eager(), torch.no_grad():
            m.sample([CAPTION] * 3, 2, torch.Generator().manual_seed(0))
        assert speed.compile_counters()["graphs"] == after_step["graphs"]
    finally:
        torch._dynamo.reset()


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile mode"):
        speed.compile_step_networks(_lcd(), mode="fastest")


def test_trainer_compiles_and_samples_eagerly(tmp_path):
    """train.compile + train.channels_last through the recipe path: the run trains, writes its sample grid
    and checkpoint, and the checkpoint's keys and values match an eager run's to float tolerance."""
    import yaml

    from fastgen.trainers.engine import checkpoint as ckpt
    from fastgen.trainers.engine import run as trun

    recipe = ROOT / "fastgen" / "recipes" / "lcd-digits.yaml"
    # SGD: its update is proportional to the gradient, so float reordering (channels-last kernels) stays tiny in
    # the weights (Adam's first updates are ~lr * sign(g), which flips for gradients near zero)
    common = ["train.max_steps=2", "train.batch_size=2", "train.optimizer=sgd", "train.learning_rate=0.01", "train.sample_every=2", "train.eval_every=0", "train.checkpoint_every=2",
              "train.log_with=none", "train.progress=false", "sample.eval_samples=0"]
    states = {}
    torch._dynamo.reset()
    try:
        for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=eager",
                                                         "train.channels_last=true"])):
            run_dir = tmp_path / name
            trainer, _ = trun.prepare_run(recipe, [f"output_dir={run_dir}", *common, *extra])
            if name == "compiled":
                assert set(trainer.compiled) == {"nets.teacher.net", "nets.student", "nets.target"}
            trainer.train()
            assert (run_dir / "samples" / "step-000002.png").is_file()
            states[name] = ckpt.load_model_state(ckpt.find_checkpoint(run_dir, "latest"))
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert saved["train"]["compile"] is (name == "compiled")
    finally:
        torch._dynamo.reset()
    assert states["eager"].keys() == states["compiled"].keys()
    worst = max(float((states["eager"][k] - states["compiled"][k]).abs().max()) for k in states["eager"])
    assert worst <= 1e-5


def test_compile_refused_with_an_unknown_mode_in_the_recipe():
    with pytest.raises(Exception, match="compile_mode"):
        from fastgen.config import load_config

        load_config(TrainConfig, None, base={"compile_mode": "fastest"})


def _resolved(**spec):
    return resolve_spec("student", OptimizerSpec(**spec), None, TrainConfig())


def test_fused_adamw_and_its_errors():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = build_optimizer(params, _resolved(fused=True), "student")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    params[0].grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(params[0]).all()
    with pytest.raises(ConfigError, match="no fused implementation"):
        build_optimizer(params, _resolved(optimizer="prodigy", fused=True), "student")
    with pytest.raises(ConfigError, match="train.optimizers.student.fused"):
        build_optimizer(params, resolve_spec("student", OptimizerSpec(options={"fused": True}), None, TrainConfig()), "student")


def test_adamw8bit_names_its_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.randn(2))], _resolved(optimizer="adamw8bit"), "student")


# --------------------------------------------------------------------------- the ladder benchmark


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput_ladder", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keep_rule(bench):
    assert bench.keep_rung(1.10, 1.2)  # faster: kept even if it costs memory
    assert bench.keep_rung(0.95, 0.80)  # leaner for <= 10% of the speed: kept
    assert not bench.keep_rung(1.00, 0.99)  # neither
    assert not bench.keep_rung(0.85, 0.50)  # leaner but more than 10% slower


def test_quick_ladder_side_by_side(bench, tmp_path):
    """A --quick ladder on the digits teacher: the reference first, each rung timed interleaved with the best
    configuration before it (its ratio is median over median of those paired steps), kept ratios chained, and the
    optimised configuration timed against a fresh reference; JSON, markdown and plot written."""
    rc = bench.main(["--quick", "--teachers", "digits", "--modes", "full", "--rungs", "reference,cache,batched_cfg,fused_adamw",
                     "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    rows = result["rows"]
    names = [r["variant"] for r in rows]
    assert names[:4] == ["reference", "cache", "batched_cfg", "fused_adamw"]
    ref = rows[0]
    assert ref["options"] == {"cache": False, "cfg_forward": "separate", "teacher_dtype": "float32", "fused": None,
                              "channels_last": False, "compile": False, "checkpointing": False, "autocast": None,
                              "ema": "loop"}
    assert ref["speedup_vs_reference"] == 1.0 and ref["kept"]
    chain = 1.0
    for r in rows[1:4]:
        assert r["samples_per_s"] > 0 and r["weights_mb"] >= 0 and r["step_mem_mb"] > 0 and math.isfinite(r["loss_last"])
        assert len(r["sec_per_step_all"]) == 2  # quick: 2 interleaved rounds
        assert math.isclose(r["speedup_over_previous"], r["paired_with_sec_per_step_median"] / r["sec_per_step_median"])
        assert math.isclose(r["speedup_vs_reference"], chain * r["speedup_over_previous"])
        assert r["kept"] == bench.keep_rung(r["speedup_over_previous"], r["mem_over_previous"])
        if r["kept"]:
            chain *= r["speedup_over_previous"]
    (summary,) = result["summary"]
    if any(r["kept"] for r in rows[1:4]):
        best = rows[-1]
        assert names == ["reference", "cache", "batched_cfg", "fused_adamw", "optimised"]
        assert best["options"] == [r for r in rows[:4] if r["kept"]][-1]["options"]
        assert math.isclose(summary["speedup"], best["paired_with_sec_per_step_median"] / best["sec_per_step_median"])
    else:
        assert names == ["reference", "cache", "batched_cfg", "fused_adamw"] and summary["speedup"] == 1.0
    md = (tmp_path / "train_throughput.md").read_text()
    assert "## Optimised against reference" in md and "## Each change's contribution" in md
    assert (tmp_path / "train_throughput.png").stat().st_size > 0


def test_reference_rung_runs_the_example_step(bench):
    """The reference configuration encodes every batch (VAE + text encoder) and runs the teacher twice;
    the cache + batched configuration runs neither encoder and the teacher once (batch 2B)."""
    from fastgen.zoo.paths import resolve_model

    spec = {"folder": str(resolve_model("digits-sd")), "mode": "full", "device": "cpu", "lora_rank": 4}
    ref_opts = dict(bench.LADDER[0][1])
    calls = {}
    for name, opts in (("reference", ref_opts), ("batched", dict(ref_opts, cfg_forward="batched", ema="foreach"))):
        m, _ = bench.ladder_method(spec, opts)
        counter = bench.CallCounter(m)
        try:
            bench.train_iteration(m, bench.ladder_optimizer(m, opts["fused"]), _batch(m), 0)
            counter.next_step()
        finally:
            counter.close()
        calls[name] = counter.summary()
        assert m.teacher.dtype == torch.float32
        # the reference's EMA update loops over the parameters (as the example script does), with the same result
        assert ("update_target" in vars(m.nets)) is (name == "reference")
        if name == "reference":
            before = [p.detach().clone() for p in m.nets.target.parameters()]
            m.nets.update_target(0.5)
            after = list(m.nets.target.parameters())
            worst = max(float((a - (0.5 * b + 0.5 * s.detach())).abs().max())
                        for a, b, s in zip(after, before, m.nets.student.parameters()))
            assert worst <= 1e-6
    assert calls["reference"]["teacher_unet_rows_per_call"] == [2, 2]
    assert calls["reference"]["vae_encoder_calls_per_step"] == 1 and calls["reference"]["text_encoder_calls_per_step"] == 1
    assert calls["batched"]["teacher_unet_rows_per_call"] == [4]


#: every digits recipe's step networks trace without a graph break (CLEAR: the token grid comes as static ints,
#: ClearFluxTransformer2DModel.token_grid, and the window mask is a constant of the graph)
NO_BREAK_RECIPES = {
    "lcd-lora-digits": [], "lcd-flux-digits": [], "boot-digits": [], "dmd-digits": [], "rg-lcd-digits-direct": [],
    "clear-digits": ["data.num_samples=4", "data.teacher_steps=2"],
    "scott-digits": ["scott.adv_start_step=1"],
    "disback-digits": ["disback.path_nodes=1", "disback.degradation_steps=1", "disback.interval=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(NO_BREAK_RECIPES))
def test_every_methods_step_traces_without_graph_breaks(recipe, tmp_path):
    """train.compile through the shared engine for each method's digits recipe (backend eager: dynamo's tracing):
    2 steps train, each step network is compiled, and dynamo records no graph break."""
    from fastgen.trainers.engine import run as trun

    common = ["train.max_steps=2", "train.batch_size=2", "train.sample_every=0", "train.eval_every=0", "train.log_with=none",
              "train.progress=false", "sample.eval_samples=0", "train.checkpoint_every=0", "train.compile=true",
              "train.compile_backend=eager"]
    torch._dynamo.reset()
    try:
        trainer, _ = trun.prepare_run(recipe, [f"output_dir={tmp_path / recipe}", *common, *NO_BREAK_RECIPES[recipe]])
        trainer.train()
        counts = speed.compile_counters()
    finally:
        torch._dynamo.reset()
    assert trainer.compiled and trainer.step == 2
    assert counts["graphs"] >= 2 and counts["graph_breaks"] == 0, counts


def test_append_keeps_the_other_teachers_rows(bench, tmp_path):
    """--append: an earlier ladder's rows of other teacher x modes are kept (with its command); rows of the
    teacher x modes being measured again, and results of the other study, are not."""
    path = tmp_path / "train_throughput.json"
    rows = [{"teacher": "digits", "mode": "full", "variant": "reference"}, {"teacher": "sd15-arch", "mode": "lora", "variant": "reference"}]
    path.write_text(json.dumps({"protocol": {"study": "ladder", "command": "python benchmarks/train_throughput.py --teachers digits",
                                             "date": "d"}, "rows": rows, "skipped": [{"teacher": "digits", "mode": "lora"}]}))
    kept, skipped, commands = bench._earlier_ladder(path, ["sd15-arch"], ["lora"], "sd15-arch")
    assert kept == rows[:1] and skipped == [{"teacher": "digits", "mode": "lora"}]
    assert commands == [{"command": "python benchmarks/train_throughput.py --teachers digits", "date": "d"}]
    path.write_text(json.dumps({"protocol": {"study": "variants"}, "rows": rows}))
    assert bench._earlier_ladder(path, ["sd15-arch"], ["lora"], "sd15-arch") == ([], [], [])
