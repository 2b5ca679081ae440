"""FSDP2 through accelerate (fastgen.trainers.engine.sharding): which modules are sharded, the refusals,
gradients / EMA / checkpoints on DTensors in one process (a gloo group of one), the shipped accelerate
configs, and 2-process gloo runs on CPU against the DDP path: same losses, exact resume across
sharded and unsharded checkpoints, a killed and resumed FSDP run, LCD on a tiny SD teacher + export."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import fsdp_train_script  # noqa: F401  (registers "toy-gan")
import toy_method  # noqa: F401  (registers "toy")
from fastgen.errors import ConfigError, FastgenError
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine import sharding
from fastgen.trainers.engine.ema import ema_update_
from fastgen.trainers.engine.sharding import FSDPSettings, Sharding, plan_sharding
from fsdp_train_script import ToyGan, ToyGanConfig

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs" / "accelerate"


def gan(seed: int = 0, **options) -> ToyGan:
    torch.manual_seed(seed)
    return ToyGan(ToyGanConfig(**options))


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else sharding.plain(p.grad).detach().clone() for p in params]


# --------------------------------------------------------------------------- 1. planning (no process group)


def test_plan_shards_trained_networks_and_the_target_like_its_student():
    m = gan()
    plans = {p.name: p for p in plan_sharding(m, m.parameter_groups(), FSDPSettings())}
    assert list(plans) == ["gen", "disc", "target"]
    assert plans["gen"].trained and plans["disc"].trained and not plans["target"].trained
    assert plans["target"].twin_of == "gen" and plans["disc"].twin_of is None
    assert all(p.shard and p.units == [] for p in plans.values())  # small MLPs: one unit each (their root)
    keep = {p.name: p for p in plan_sharding(m, m.parameter_groups(), FSDPSettings(frozen="keep"))}
    assert keep["target"].shard, "an EMA/target copy is sharded like its student even with fsdp_frozen=keep"
    assert "frozen, shaped like gen" in keep["target"].describe()
    # bf16 compute for trained networks and their copies only
    bf16 = {p.name: p for p in plan_sharding(m, m.parameter_groups(), FSDPSettings(param_dtype=torch.bfloat16))}
    assert bf16["gen"].param_dtype == bf16["target"].param_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("fsdp") / "tiny-sd", prediction_type="epsilon")


@pytest.fixture(scope="module")
def lcd(tiny_sd):
    from fastgen.trainers.method import get_method
    from tiny_models import build_method

    return build_method(get_method("lcd"), teacher=str(tiny_sd))


def test_plan_of_lcd_on_a_tiny_sd_teacher(lcd):
    plans = {p.name: p for p in plan_sharding(lcd, lcd.parameter_groups(), FSDPSettings())}
    assert set(plans) == {"nets.teacher.net", "nets.teacher.vae", "nets.teacher.text_encoders.0", "nets.student", "nets.target"}
    student = plans["nets.student"]
    assert student.trained and plans["nets.target"].twin_of == "nets.student"
    assert not plans["nets.teacher.net"].trained and plans["nets.teacher.net"].twin_of is None  # no guidance embedding
    units = student.units
    for unit in ("down_blocks.0.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0",
                 "down_blocks.0", "mid_block", "up_blocks.0"):
        assert unit in units, unit
    assert units.index("down_blocks.0.resnets.0") < units.index("down_blocks.0")  # innermost first
    assert plans["nets.target"].units == units
    assert any(u.endswith("encoder.layers.0") for u in plans["nets.teacher.text_encoders.0"].units)  # CLIPEncoderLayer
    assert any(u.startswith("encoder.down_blocks.") for u in plans["nets.teacher.vae"].units)
    assert all(p.shard for p in plans.values())
    # fsdp_frozen=keep: the teacher's networks stay whole, the trained student and its target do not
    keep = {p.name: p.shard for p in plan_sharding(lcd, lcd.parameter_groups(), FSDPSettings(frozen="keep"))}
    assert keep == {"nets.teacher.net": False, "nets.teacher.vae": False, "nets.teacher.text_encoders.0": False,
                    "nets.student": True, "nets.target": True}
    # the plugin's class list replaces the defaults; a name no network contains is an error
    only = {p.name: p for p in plan_sharding(lcd, lcd.parameter_groups(),
                                             FSDPSettings(block_classes=("BasicTransformerBlock",), explicit_blocks=True))}
    assert only["nets.student"].units and all(".transformer_blocks." in u for u in only["nets.student"].units)
    with pytest.raises(ConfigError, match="FluxTransformerBlock"):
        plan_sharding(lcd, lcd.parameter_groups(), FSDPSettings(block_classes=("FluxTransformerBlock",), explicit_blocks=True))
    none = {p.name: p.units for p in plan_sharding(lcd, lcd.parameter_groups(), FSDPSettings(wrap="none"))}
    assert all(u == [] for u in none.values())
    size = {p.name: p.units for p in plan_sharding(lcd, lcd.parameter_groups(), FSDPSettings(wrap="size", min_num_params=5000))}
    assert size["nets.student"] and len(size["nets.student"]) < len(units)


def test_methods_fsdp_cannot_run_are_refused_with_the_reason(tiny_sd):
    # found by training every digits recipe under 2-process FSDP on CPU: these two failed, the others matched DDP
    from fastgen.trainers.method import get_method
    from tiny_models import build_method

    scott = build_method(get_method("scott"), teacher=str(tiny_sd))
    with pytest.raises(FastgenError, match="'disc' .*FeatureTap.*scott.adv_weight=0"):
        plan_sharding(scott, scott.parameter_groups(), FSDPSettings())
    assert sharding.unsupported_reason(build_method(get_method("scott"), teacher=str(tiny_sd), adv_weight=0.0)) is None
    disback = build_method(get_method("disback"), teacher=str(tiny_sd), path_nodes=1, degradation_steps=1, interval=1)
    with pytest.raises(FastgenError, match="path nodes.*rank 0 alone.*8gpu-ddp.yaml"):
        plan_sharding(disback, disback.parameter_groups(), FSDPSettings())
    dmd_like = build_method(get_method("disback"), teacher=str(tiny_sd), path_nodes=0)
    plans = {p.name: p for p in plan_sharding(dmd_like, dmd_like.parameter_groups(), FSDPSettings())}
    assert plans["generator"].trained and plans["fake"].trained and plans["teacher.net"].shard


class _Box(torch.nn.Module):
    """A container without forward that holds a parameter beside a network."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.net = torch.nn.Linear(3, 3)


def test_refusals_name_the_reason(monkeypatch, tmp_path):
    m = gan()
    m.log_scale = torch.nn.Parameter(torch.zeros(()))
    with pytest.raises(FastgenError, match="holds parameters directly"):
        plan_sharding(m, m.parameter_groups(), FSDPSettings())
    m = gan()
    m.box = _Box()
    with pytest.raises(FastgenError, match="'box'.*holds parameters of its own"):
        plan_sharding(m, m.parameter_groups(), FSDPSettings())

    # the plugin, read from the environment `accelerate launch` sets (as on a CPU launch)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), distributed_type=None, num_processes=2, process_index=0)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported.*fsdp_version 2"):
        sharding.settings_from_accelerator(acc)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="fp16 is not supported with FSDP.*bf16"):
        sharding.settings_from_accelerator(acc, "fp16")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicTransformerBlock,T5Block")
    s = sharding.settings_from_accelerator(acc, "bf16", "keep")
    assert (s.reshard_after_forward, s.wrap, s.block_classes, s.explicit_blocks, s.param_dtype, s.frozen) == (
        False, "blocks", ("BasicTransformerBlock", "T5Block"), True, torch.bfloat16, "keep")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    assert sharding.settings_from_accelerator(acc).wrap == "none"
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    monkeypatch.setenv("FSDP_MIN_NUM_PARAMS", "1000")
    s = sharding.settings_from_accelerator(acc)
    assert (s.wrap, s.min_num_params, s.block_classes) == ("size", 1000, sharding.DEFAULT_BLOCK_CLASSES)
    assert sharding.fsdp_requested(acc)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not sharding.fsdp_requested(acc) and Sharding.from_accelerator(acc) is None

    # the trainer still refuses DeepSpeed (and names what works)
    from accelerate.utils import DistributedType

    from fastgen.trainers.engine.trainer import TrainConfig, Trainer

    with pytest.raises(FastgenError, match="DEEPSPEED.*not supported.*FSDP2"):
        Trainer(gan(), TrainConfig(max_steps=1), tmp_path / "run", accelerator=SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    from fastgen.trainers.engine.run import FREE_CONFIG_KEYS, load_run_config

    with pytest.raises(ConfigError, match="fsdp_frozen"):
        load_run_config("toy", ["train.fsdp_frozen=maybe"])
    assert load_run_config("toy", ["train.fsdp_frozen=keep"])[0].train.fsdp_frozen == "keep"
    assert "train.fsdp_frozen" in FREE_CONFIG_KEYS  # a resume may change where frozen weights live


# --------------------------------------------------------------------------- 2. DTensors in one process


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A gloo process group of one: FSDP2 runs (all-gathers of one shard), parameters become DTensors."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_gan(seed: int = 0, **options) -> tuple[ToyGan, Sharding]:
    m = gan(seed, **options)
    s = Sharding(FSDPSettings(), world_size=1, rank=0)
    s.apply(m, m.parameter_groups(), torch.device("cpu"))
    return m, s


def gan_batch(m: ToyGan) -> dict:
    return {"x": m.data_x[:8].clone(), "y": m.data_y[:8].clone()}


def test_sharded_backward_per_group_equals_unsharded_inputs_backward(group):
    ref = gan()
    torch.manual_seed(1)
    out = ref.train_step(gan_batch(ref), 0)
    torch.autograd.backward(out.losses["gen"], inputs=list(ref.gen.parameters()), retain_graph=True)
    torch.autograd.backward(out.losses["disc"], inputs=list(ref.disc.parameters()))
    want = grads(ref.gen.parameters()) + grads(ref.disc.parameters())
    assert all(g is not None for g in want)

    # what the trainer must not do under FSDP2: inputs= names the sharded parameters, which the graph
    # (through all-gathered unsharded copies) never reaches: no gradient at all, and no error
    m, _ = sharded_gan()
    assert all(sharding.is_sharded(p) for p in m.parameters())
    torch.manual_seed(1)
    out = m.train_step(gan_batch(m), 0)
    torch.autograd.backward(out.losses["gen"], inputs=list(m.gen.parameters()))
    assert all(p.grad is None for p in m.gen.parameters())

    m, _ = sharded_gan()
    torch.manual_seed(1)
    out = m.train_step(gan_batch(m), 0)
    groups = m.parameter_groups()
    sharding.backward_per_group([(out.losses["gen"], ["gen"]), (out.losses["disc"], ["disc"])], groups,
                                sharding.trainable_parameters(m))
    got = grads(m.gen.parameters()) + grads(m.disc.parameters())
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-6
    # the generator loss reaches the discriminator; its gradient there is dropped, as with inputs=
    m2, _ = sharded_gan()
    torch.manual_seed(1)
    out = m2.train_step(gan_batch(m2), 0)
    sharding.backward_per_group([(out.losses["gen"], ["gen"])], m2.parameter_groups(), sharding.trainable_parameters(m2))
    assert all(p.grad is None for p in m2.disc.parameters()) and all(p.grad is not None for p in m2.gen.parameters())
    assert all(p.grad is None for p in m2.target.parameters())


def test_ema_shadows_and_targets_follow_the_sharding(group):
    m, s = sharded_gan()
    assert all(sharding.is_sharded(t) for t in m.ema.shadow.values())
    assert all(sharding.is_sharded(p) for p in m.target.parameters())
    before = {k: sharding.plain(v).clone() for k, v in m.ema.state_dict("ema.").items()}
    with torch.no_grad():
        for p in m.gen.parameters():
            p.add_(1.0)
    m.after_optimizer_step("gen", 0)  # ema_update_ of the sharded target + EMA.update
    after = {k: sharding.plain(v) for k, v in m.ema.state_dict("ema.").items()}
    assert float((after["ema.shadow.0.weight"] - before["ema.shadow.0.weight"]).mean()) == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError, match="sharded alike|sharded exactly like"):
        ema_update_(m.target.parameters(), [torch.zeros(p.shape) for p in m.target.parameters()], 0.5)
    assert "gen (Sequential, trained): sharded in 1 FSDP unit" in s.describe()


def test_checkpoint_state_is_full_and_cuts_back_into_shards(group, tmp_path):
    m, s = sharded_gan()
    opt = torch.optim.AdamW(m.parameter_groups()["gen"], lr=0.01)
    torch.manual_seed(1)
    out = m.train_step(gan_batch(m), 0)
    sharding.backward_per_group([(out.losses["gen"], ["gen"])], m.parameter_groups(), sharding.trainable_parameters(m))
    opt.step()
    m.after_optimizer_step("gen", 0)

    raw = m.checkpoint_state_dict()
    with pytest.raises(TypeError, match="sharded DTensor.*full_state_dict"):
        ckpt.write_safetensors(tmp_path / "bad.safetensors", raw)
    full = sharding.full_state_dict(raw)
    plain_keys = {k: tuple(v.shape) for k, v in gan().checkpoint_state_dict().items()}
    assert {k: tuple(v.shape) for k, v in full.items()} == plain_keys  # the unsharded format
    assert not any(sharding.is_sharded(v) for v in full.values())
    ckpt.write_safetensors(tmp_path / "model.safetensors", full)
    opt_full = sharding.full_optimizer_state(opt.state_dict())
    assert not any(sharding.is_sharded(v) for st in opt_full["state"].values() for v in st.values())
    assert [tuple(st["exp_avg"].shape) for st in opt_full["state"].values()] == [tuple(p.shape) for p in m.gen.parameters()]

    # a fresh sharded method + optimizer restored from the full files equal the trained ones
    m2, _ = sharded_gan(seed=5)
    m2.load_checkpoint_state_dict(sharding.shard_like(ckpt.load_model_state(tmp_path / "model.safetensors"), m2.checkpoint_state_dict()))
    assert all(torch.equal(sharding.plain(v), full[k]) for k, v in m2.checkpoint_state_dict().items())
    opt2 = torch.optim.AdamW(m2.parameter_groups()["gen"], lr=0.01)
    opt2.load_state_dict(sharding.shard_optimizer_state(opt2, opt_full))
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert sharding.is_sharded(b["exp_avg"]) and torch.equal(a["exp_avg"].full_tensor(), b["exp_avg"].full_tensor())


class _CachedGroups(ToyGan):
    def __init__(self, config, **shared):
        super().__init__(config, **shared)
        self._groups = {"gen": list(self.gen.parameters()), "disc": list(self.disc.parameters())}

    def parameter_groups(self):
        return self._groups


def test_cached_parameter_lists_are_refused(group):
    torch.manual_seed(0)
    m = _CachedGroups(ToyGanConfig())
    s = Sharding(FSDPSettings(), world_size=1, rank=0)
    s.apply(m, m.parameter_groups(), torch.device("cpu"))
    with pytest.raises(FastgenError, match="unsharded parameter.*not lists cached"):
        s.check_groups(m.parameter_groups(), "cached")


# --------------------------------------------------------------------------- 3. accelerate config files


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"1gpu": (DistributedType.NO, 1), "8gpu-ddp": (DistributedType.MULTI_GPU, 8), "8gpu-fsdp": (DistributedType.FSDP, 8)}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(expected)
    for name, (kind, processes) in expected.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert (cfg.distributed_type, cfg.num_processes, cfg.mixed_precision) == (kind, processes, "bf16"), name
    fsdp = load_config_from_file(str(CONFIGS / "8gpu-fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2, full shard
    assert fsdp["fsdp_offload_params"] is False


# --------------------------------------------------------------------------- 4. two processes (gloo, CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("ACCELERATE_USE_FSDP", None)
    return env


def launch_cmd(plan_file: Path) -> list[str]:
    """The shipped 8-GPU FSDP config, with 2 processes (on CPU: gloo, accelerate's MULTI_CPU + FSDP_* env)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "8gpu-fsdp.yaml"),
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(TESTS / "fsdp_train_script.py"), str(plan_file)]


def launch(tmp_path: Path, plan: list[dict], timeout: int = 300) -> Path:
    out = tmp_path / "out"
    for spec in plan:
        spec.setdefault("out", str(out))
    plan_file = tmp_path / f"plan-{time.time_ns()}.json"
    plan_file.write_text(json.dumps(plan))
    r = subprocess.run(launch_cmd(plan_file), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return out


def recipe(path: Path, method: str, train: dict, options: dict | None = None) -> Path:
    base = {"batch_size": 4, "learning_rate": 0.01, "log_with": "none", "progress": False, "log_every": 5}
    data = {"method": method, "output_dir": str(path.with_suffix("")), "train": {**base, **train},
            method.replace("-", "_"): dict(options or {})}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def result(out: Path, name: str) -> dict:
    from safetensors.torch import load_file

    r = {"losses": [json.loads((out / name / f"losses-rank{i}.json").read_text()) for i in (0, 1)],
         "weights": [load_file(str(out / name / f"weights-rank{i}.safetensors")) for i in (0, 1)],
         "info": [json.loads((out / name / f"info-rank{i}.json").read_text()) for i in (0, 1)]}
    assert r["losses"][0] == r["losses"][1]  # every rank logs the same (all-reduced) numbers
    assert max_diff(r["weights"][0], r["weights"][1]) == 0.0  # and holds the same full state
    return r


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def loss_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b))
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k.startswith("loss/"))


def checkpoint_layout(path: Path) -> tuple[dict, dict]:
    model = {k: tuple(v.shape) for k, v in ckpt.load_model_state(path).items()}
    opt = ckpt.load_torch(path / ckpt.OPTIMIZER_FILE)
    shapes = {n: {pid: {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in st.items() if k != "step"}
                  for pid, st in o["state"].items()} for n, o in opt["optimizers"].items()}
    return model, shapes


# about 10 s on 2 busy cores (one 2-process start-up, 7 short runs): part of the default suite
def test_fsdp_two_processes_equal_ddp_and_resume_across_sharded_and_unsharded(tmp_path):
    # toy: one group, dropout + input noise + gradient accumulation; toy-gan: two losses in one iteration,
    # a discriminator stepping every 2nd iteration, a target lerped towards the generator, an EMA
    toy_train = {"max_steps": 4, "gradient_accumulation_steps": 2, "checkpoint_every": 2, "sample_every": 2}
    gan_train = {"max_steps": 4, "checkpoint_every": 2, "sample_every": 4}
    toy = recipe(tmp_path / "toy.yaml", "toy", toy_train, {"dropout": 0.1, "input_noise": 0.05})
    g = recipe(tmp_path / "gan.yaml", "toy-gan", gan_train, {"disc_every": 2})
    runs = lambda name: str(tmp_path / "runs" / name)  # noqa: E731
    mid = lambda name: str(tmp_path / "runs" / name / "checkpoints" / "checkpoint-000002")  # noqa: E731
    plan = [
        {"name": "toy-ddp", "recipe": str(toy), "overrides": [f"output_dir={runs('toy-ddp')}"], "fsdp": False},
        {"name": "toy-fsdp", "recipe": str(toy), "overrides": [f"output_dir={runs('toy-fsdp')}"], "fsdp": True},
        {"name": "gan-ddp", "recipe": str(g), "overrides": [f"output_dir={runs('gan-ddp')}"], "fsdp": False},
        {"name": "gan-fsdp", "recipe": str(g), "overrides": [f"output_dir={runs('gan-fsdp')}"], "fsdp": True},
        # resumed at step 2 from the FSDP run's checkpoint, sharded and unsharded; and FSDP from the DDP one
        {"name": "gan-fsdp-from-fsdp", "recipe": str(g), "overrides": [f"output_dir={runs('r1')}"], "resume": mid("gan-fsdp"), "fsdp": True},
        {"name": "gan-ddp-from-fsdp", "recipe": str(g), "overrides": [f"output_dir={runs('r2')}"], "resume": mid("gan-fsdp"), "fsdp": False},
        {"name": "gan-fsdp-from-ddp", "recipe": str(g), "overrides": [f"output_dir={runs('r3')}"], "resume": mid("gan-ddp"), "fsdp": True},
    ]
    out = launch(tmp_path, plan)
    res = {spec["name"]: result(out, spec["name"]) for spec in plan}
    for name in ("toy-fsdp", "gan-fsdp", "gan-fsdp-from-fsdp", "gan-fsdp-from-ddp"):
        info = res[name]["info"][0]
        assert info["sharded"] and info["world_size"] == 2, name
        assert set(info["param_types"].values()) == {"DTensor"}, name
    assert not res["gan-ddp"]["info"][0]["sharded"] and set(res["gan-ddp"]["info"][0]["param_types"].values()) == {"Parameter"}
    assert "target (Sequential, frozen, shaped like gen)" in res["gan-fsdp"]["info"][0]["plan"]

    # FSDP == DDP: every iteration's losses and the final weights (student, target, EMA)
    for kind in ("toy", "gan"):
        a, b = res[f"{kind}-ddp"], res[f"{kind}-fsdp"]
        assert loss_diff(a["losses"][0], b["losses"][0]) <= 1e-5, kind
        assert max_diff(a["weights"][0], b["weights"][0]) <= 1e-5, kind
        assert len(a["losses"][0]) == 4
    assert "loss/disc" in res["gan-fsdp"]["losses"][0][0] and "loss/disc" not in res["gan-fsdp"]["losses"][0][1]

    # resumed at step 2 == uninterrupted, whichever way the checkpoint was written and is read
    full_fsdp, full_ddp = res["gan-fsdp"], res["gan-ddp"]
    assert max_diff(res["gan-fsdp-from-fsdp"]["weights"][0], full_fsdp["weights"][0]) <= 1e-6
    assert loss_diff(res["gan-fsdp-from-fsdp"]["losses"][0], full_fsdp["losses"][0][2:]) <= 1e-6
    assert max_diff(res["gan-ddp-from-fsdp"]["weights"][0], full_ddp["weights"][0]) <= 1e-5
    assert max_diff(res["gan-fsdp-from-ddp"]["weights"][0], full_fsdp["weights"][0]) <= 1e-5

    # checkpoints of a sharded run have the unsharded layout (model and optimizer state)
    for step in ("checkpoint-000002", "checkpoint-000004"):
        assert checkpoint_layout(Path(runs("gan-fsdp")) / "checkpoints" / step) == checkpoint_layout(Path(runs("gan-ddp")) / "checkpoints" / step)
    assert (Path(runs("toy-fsdp")) / "samples" / "step-000004.png").is_file()  # sample grids: every rank samples, rank 0 writes
    assert ckpt.read_latest(Path(runs("gan-fsdp")) / "checkpoints") == "checkpoint-000004"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children before their parents are listed last."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            out.extend(_descendants(child))
            out.append(child)
    return out


# about 16 s (two 2-process start-ups and a kill): part of the default suite
def test_fsdp_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    train = {"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 0}
    options = {"dropout": 0.1, "input_noise": 0.05}
    toy = recipe(tmp_path / "toy.yaml", "toy", train, options)
    killed_dir = tmp_path / "runs" / "killed"
    plan = [{"name": "killed", "recipe": str(toy), "overrides": [f"output_dir={killed_dir}", "toy.step_sleep=0.4"], "fsdp": True,
             "out": str(tmp_path / "out")}]
    plan_file = tmp_path / "plan-kill.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.Popen(launch_cmd(plan_file), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            name = latest.read_text().strip() if latest.exists() else ""
            if name and ckpt.checkpoint_step(name) >= 2:
                break
            assert proc.poll() is None, "the FSDP run ended before it could be killed"
            time.sleep(0.05)
    finally:
        # the launcher and both ranks (torch's elastic agent starts its workers in sessions of their own)
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    time.sleep(1.0)  # nothing may write after the kill
    killed_at = ckpt.checkpoint_step(latest.read_text().strip())
    assert 2 <= killed_at < 8 and not (killed_dir / "checkpoints" / "checkpoint-000008").exists()
    assert ckpt.checkpoint_step(latest.read_text().strip()) == killed_at, "a rank survived the kill"

    plan = [
        {"name": "resumed", "recipe": str(toy), "overrides": [f"output_dir={killed_dir}", "toy.step_sleep=0"], "resume": "latest",
         "allow": ["toy.step_sleep"], "fsdp": True},
        {"name": "straight", "recipe": str(toy), "overrides": [f"output_dir={tmp_path / 'runs' / 'straight'}"], "fsdp": True},
    ]
    out = launch(tmp_path, plan)
    resumed, straight = result(out, "resumed"), result(out, "straight")
    assert len(resumed["losses"][0]) == 8 - killed_at
    assert loss_diff(resumed["losses"][0], straight["losses"][0][killed_at:]) <= 1e-6
    assert max_diff(resumed["weights"][0], straight["weights"][0]) <= 1e-6
    assert max_diff(ckpt.load_model_state(killed_dir / "checkpoints" / "checkpoint-000008"), straight["weights"][0]) <= 1e-6


# about 35 s: marked slow (`make test-slow`)
@pytest.mark.slow
def test_lcd_fsdp_on_tiny_sd_equals_ddp_and_exports(tiny_sd, tmp_path):
    lcd_recipe = str(ROOT / "fastgen" / "recipes" / "lcd-digits.yaml")
    common = [f"teacher.path={tiny_sd}", "train.batch_size=2", "train.sample_every=3", "train.eval_every=0",
              "train.log_with=none", "train.progress=false", "sample.eval_samples=4", "train.max_steps=3",
              "train.checkpoint_every=3", "lcd.caption_dropout=0.2"]
    runs = tmp_path / "runs"
    plan = [{"name": n, "recipe": lcd_recipe, "overrides": [*common, f"output_dir={runs / n}"], "fsdp": n == "fsdp"} for n in ("ddp", "fsdp")]
    out = launch(tmp_path, plan)
    ddp, fsdp = result(out, "ddp"), result(out, "fsdp")
    assert "nets.student (UNet2DConditionModel, trained): sharded in" in fsdp["info"][0]["plan"]
    assert "nets.target (UNet2DConditionModel, frozen, shaped like nets.student)" in fsdp["info"][0]["plan"]
    assert "FSDPResnetBlock2D" in fsdp["info"][0]["fsdp_classes"] and "FSDPCLIPEncoderLayer" in fsdp["info"][0]["fsdp_classes"]
    assert loss_diff(ddp["losses"][0], fsdp["losses"][0]) <= 1e-5
    assert max_diff(ddp["weights"][0], fsdp["weights"][0]) <= 1e-5
    assert (runs / "fsdp" / "samples" / "step-000003.png").is_file()
    # the sharded run's checkpoint is an ordinary one: a single process exports it with stock tooling
    export = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "fastgen.cli", "export", str(runs / "fsdp"), str(export)], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (export / "model_index.json").is_file() and (export / "unet").is_dir()
    from fastgen.trainers.engine.run import load_method_from_run

    method, _ = load_method_from_run(runs / "fsdp")
    assert max_diff({k: v for k, v in method.checkpoint_state_dict().items()}, fsdp["weights"][0]) == 0.0
