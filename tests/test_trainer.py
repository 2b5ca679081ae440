"""The generic trainer: exact resume after a real kill, crash-safe checkpoints, the NaN guard,
gradient accumulation, 2-process DDP, sample grids / metrics / config, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import toy_method  # noqa: F401  (registers the "toy" method)
from fastgen.errors import ConfigError
from fastgen.trainers.engine import trainer as tbase
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine import run as trun
from fastgen.trainers.engine.optim import lr_lambda
from fastgen.trainers.engine.trainer import NonFiniteLossError, ShardedBatchSampler
from fastgen.workflows import train as wf_train
from toy_method import toy_evaluator
from fastgen.trainers.engine.ema import EMA, ema_update_

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

BASE_TRAIN = {
    "batch_size": 4,
    "learning_rate": 0.01,
    "log_with": "none",
    "progress": False,
    "checkpoint_every": 0,
    "log_every": 5,
}


def write_recipe(path: Path, output_dir: Path, train: dict | None = None, toy: dict | None = None, method: str = "toy",
                 **sections: dict) -> Path:
    section = method.replace("-", "_")
    data = {"method": method, "output_dir": str(output_dir), "train": {**BASE_TRAIN, **(train or {})}, section: dict(toy or {}), **sections}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_inprocess(tmp_path: Path, name: str, train=None, toy=None, resume=None, method: str = "toy", **sections):
    recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, train, toy, method, **sections)
    trainer, cfg = trun.prepare_run(recipe, [], resume, evaluator=toy_evaluator)
    trainer.train(resume=resume)
    return trainer


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state(ckpt.find_checkpoint(run_dir, "latest"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastgen.workflows.train", str(recipe), "--import", "toy_method", *extra]


# --------------------------------------------------------------------------- 1. resume after SIGKILL


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    train = {"max_steps": 24, "checkpoint_every": 4, "keep_checkpoints": 2}
    # dropout + input noise + shuffled data: exact equality needs RNG, data position and Adam state restored
    toy = {"dropout": 0.2, "input_noise": 0.1, "step_sleep": 0.06}
    full = write_recipe(tmp_path / "full.yaml", tmp_path / "full", train, {**toy, "step_sleep": 0.0})
    killed = write_recipe(tmp_path / "killed.yaml", tmp_path / "killed", train, toy)
    env = subprocess_env()
    p_full = subprocess.Popen(cli(full), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p_kill = subprocess.Popen(cli(killed), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 60
    while time.time() < deadline:
        name = latest.read_text().strip() if latest.exists() else ""
        if name and int(name.split("-")[1]) >= 8:
            break
        assert p_kill.poll() is None, p_kill.communicate()[0].decode()[-2000:]
        time.sleep(0.02)
    p_kill.send_signal(signal.SIGKILL)
    p_kill.wait(timeout=30)
    assert p_kill.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 8 <= killed_at < 24, "the kill must land before the end of training"
    assert not (tmp_path / "killed" / "checkpoints" / "checkpoint-000024").exists()

    out, _ = p_full.communicate(timeout=90)
    assert p_full.returncode == 0, out.decode()[-3000:]
    # toy.step_sleep only slows the toy down; a resume accepts a changed method option when it is named
    r = subprocess.run(cli(killed, "toy.step_sleep=0", "--resume", "latest", "--allow-config-change", "toy.step_sleep"),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]

    state = json.loads((tmp_path / "killed" / "checkpoints" / "checkpoint-000024" / "trainer_state.json").read_text())
    assert state["step"] == 24 and state["data_position"] == 24
    assert max_diff(final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")) <= 1e-6
    # keep_checkpoints=2: older ones pruned
    names = [p.name for _, p in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert names == ["checkpoint-000020", "checkpoint-000024"]


# --------------------------------------------------------------------------- 2. crash while writing


CRASH_SNIPPET = textwrap.dedent(
    """
    import os, sys
    import toy_method
    from fastgen.trainers.engine import checkpoint as ckpt, run
    real = ckpt.fsync_file
    def dying(path):
        real(path)
        # the checkpoint of step 8 dies right after its first file (the weights) is on disk
        if path.parent.name == ".tmp-checkpoint-000008" and path.name == ckpt.MODEL_FILE:
            os._exit(17)
    ckpt.fsync_file = dying
    trainer, _ = run.prepare_run(sys.argv[1], [], None, evaluator=toy_method.toy_evaluator)
    trainer.train()
    """
)


def test_crash_while_writing_checkpoint_keeps_previous_one(tmp_path):
    train = {"max_steps": 12, "checkpoint_every": 4, "eval_every": 2}
    toy = {"dropout": 0.1, "input_noise": 0.1}
    recipe = write_recipe(tmp_path / "crash.yaml", tmp_path / "crash", train, toy)
    metrics = tmp_path / "crash" / "metrics.jsonl"
    r = subprocess.run(
        [sys.executable, "-c", CRASH_SNIPPET, str(recipe)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=90
    )
    assert r.returncode == 17, r.stderr[-3000:]
    cdir = tmp_path / "crash" / "checkpoints"
    assert ckpt.read_latest(cdir) == "checkpoint-000004"
    half = cdir / ".tmp-checkpoint-000008"
    assert sorted(p.name for p in half.iterdir()) == [ckpt.MODEL_FILE]  # really half-written
    assert not (cdir / "checkpoint-000008").exists()
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [2, 4, 6, 8]

    # the previous checkpoint loads and resumes to the same weights as an uninterrupted run
    method, cfg = trun.load_method_from_run(tmp_path / "crash")
    assert cfg.train.max_steps == 12
    resumed = trun.prepare_run(recipe, [], "latest", evaluator=toy_evaluator)[0]
    resumed.train(resume="latest")
    assert not half.exists(), "leftovers of the interrupted save are cleaned up"
    # rows written after the resumed checkpoint were dropped, then written again: no duplicates
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [2, 4, 6, 8, 10, 12]
    reference = run_inprocess(tmp_path, "reference", train, toy)
    assert max_diff(final_weights(tmp_path / "crash"), final_weights(reference.run_dir)) <= 1e-6


def test_latest_pointer_is_replaced_atomically_and_orphans_are_replaced(tmp_path):
    cdir = tmp_path / "checkpoints"
    ckpt.save_checkpoint(cdir, 2, {"w": torch.ones(3)}, {"step": 2})
    # a finished folder that `latest` does not name (kill between rename and pointer update)
    tmp = ckpt.begin_checkpoint(cdir, 4)
    ckpt.write_safetensors(tmp / ckpt.MODEL_FILE, {"w": torch.zeros(3)})
    ckpt.write_json(tmp / ckpt.STATE_FILE, {"step": 4})
    os.rename(tmp, cdir / "checkpoint-000004")
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "checkpoint-000002"
    ckpt.save_checkpoint(cdir, 4, {"w": torch.full((3,), 7.0)}, {"step": 4})
    assert ckpt.read_latest(cdir) == "checkpoint-000004"
    assert float(ckpt.load_model_state(cdir / "checkpoint-000004")["w"][0]) == 7.0
    assert not [p for p in cdir.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- 3. NaN guard


def test_nan_guard_skips_steps_and_counts(tmp_path):
    trainer = run_inprocess(
        tmp_path, "nan", {"max_steps": 7, "checkpoint_every": 0}, {"nan_steps": [2, 3], "record": True, "dropout": 0.0}
    )
    hist = trainer.method.weight_history  # weights at the start of each iteration
    assert trainer.skipped_nonfinite == 2 and trainer.nonfinite_in_row == 0
    assert torch.equal(hist[3], hist[2]) and torch.equal(hist[4], hist[3])  # steps 2, 3 skipped
    assert not torch.equal(hist[2], hist[1]) and not torch.equal(hist[5], hist[4])  # others step
    assert trainer.method.ema.num_updates == 5  # after_optimizer_step not called when skipped
    assert all(torch.isfinite(p).all() for p in trainer.method.parameters())
    state = json.loads((trainer.last_checkpoint / ckpt.STATE_FILE).read_text())
    assert state["skipped_nonfinite"] == 2


def test_nan_guard_aborts_after_n_in_a_row(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run_inprocess(tmp_path, "nan", {"max_steps": 50, "max_nonfinite_in_row": 3}, {"nan_steps": list(range(4, 50))})
    msg = str(info.value)
    assert "step 6" in msg and "3 consecutive" in msg
    assert "learning rate" in msg and "mixed_precision" in msg and "data" in msg


# --------------------------------------------------------------------------- 4. clear errors


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "empty-run", {"max_steps": 3})
    with pytest.raises(ckpt.CheckpointError) as info:
        wf_train.train(recipe, resume="latest")
    msg = str(info.value)
    assert str(tmp_path / "empty-run") in msg and "without --resume" in msg
    assert not (tmp_path / "empty-run").exists(), "a failed resume writes nothing"
    # same through the command line entry
    assert wf_train.main([str(recipe), "--import", "toy_method", "--resume", "latest"]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    run_inprocess(tmp_path, "done", {"max_steps": 2})
    with pytest.raises(ConfigError, match="--resume latest"):
        run_inprocess(tmp_path, "done", {"max_steps": 4})


def test_load_method_from_run(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a fastgen run folder: .*config.yaml' is missing"):
        trun.load_method_from_run(tmp_path / "nothing")
    # config.yaml but only an interrupted (temp) checkpoint
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "partial", {"max_steps": 2})
    trun.prepare_run(recipe)
    (tmp_path / "partial" / "checkpoints" / ".tmp-checkpoint-000002").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError) as info:
        trun.load_method_from_run(tmp_path / "partial")
    msg = str(info.value)
    assert str(tmp_path / "partial") in msg and "no finished checkpoint" in msg and "checkpoint_every" in msg

    trainer = run_inprocess(tmp_path, "ok", {"max_steps": 3})
    method, cfg = trun.load_method_from_run(trainer.run_dir)
    assert type(method).__name__ == "ToyMethod" and not method.training and cfg.train.max_steps == 3
    assert max_diff(method.checkpoint_state_dict(), trainer.method.checkpoint_state_dict()) == 0.0
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-000099"):
        trun.load_method_from_run(trainer.run_dir, "checkpoint-000099")


# --------------------------------------------------------------------------- 5. gradient accumulation


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    toy = {"dropout": 0.0, "input_noise": 0.0, "num_items": 48}
    accum = run_inprocess(tmp_path, "accum", {"max_steps": 5, "batch_size": 4, "gradient_accumulation_steps": 2}, toy)
    big = run_inprocess(tmp_path, "big", {"max_steps": 5, "batch_size": 8}, toy)
    small = run_inprocess(tmp_path, "small", {"max_steps": 5, "batch_size": 4}, toy)
    a, b, c = (final_weights(t.run_dir) for t in (accum, big, small))
    assert max_diff(a, b) <= 1e-6
    assert max_diff(a, c) > 1e-4  # accumulation really used both micro-batches
    assert accum.data_position == 10 and big.data_position == 5


def test_two_optimizers_alternate(tmp_path):
    trainer = run_inprocess(
        tmp_path, "two", {"max_steps": 5, "learning_rates": {"body": 0.05}}, {"two_groups": True, "record": True}
    )
    m = trainer.method
    n_body = sum(p.numel() for p in m.body.parameters())
    hist = m.weight_history
    for step in range(4):
        body_changed = not torch.equal(hist[step + 1][:n_body], hist[step][:n_body])
        head_changed = not torch.equal(hist[step + 1][n_body:], hist[step][n_body:])
        assert head_changed and body_changed == (step % 2 == 0), step
    assert trainer.optimizers["body"].param_groups[0]["lr"] == 0.05
    assert trainer.optimizers["head"].param_groups[0]["lr"] == 0.01
    with pytest.raises(ConfigError, match="did you mean 'body'"):
        run_inprocess(tmp_path, "two-bad", {"max_steps": 1, "learning_rates": {"bdy": 0.05}}, {"two_groups": True})


SPEC_TRAIN = {
    "max_steps": 10,
    "learning_rate": 0.02,
    "optimizers": {
        # every third iteration, SGD with momentum, clipped, linear decay after 2 warm-up updates
        "body": {"optimizer": "sgd", "momentum": 0.9, "max_grad_norm": 0.05, "lr_scheduler": "linear", "warmup_steps": 2},
        # every iteration, Adam with GAN-style betas, no clipping, cosine decay
        "head": {"optimizer": "adam", "betas": [0.5, 0.9], "learning_rate": 0.01, "clip": False, "lr_scheduler": "cosine"},
    },
}


def test_per_group_optimizer_specs(tmp_path, monkeypatch):
    toy = {"two_groups": True, "body_every": 3, "record": True}
    clips: list[tuple[int, float]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        clips.append((len(list(params)), float(max_norm)))
        return real_clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    trainer = run_inprocess(tmp_path, "spec", {**SPEC_TRAIN, "checkpoint_every": 5}, toy)
    body, head = trainer.optimizers["body"], trainer.optimizers["head"]
    assert type(body) is torch.optim.SGD and body.param_groups[0]["momentum"] == 0.9
    assert type(head) is torch.optim.Adam and head.param_groups[0]["betas"] == (0.5, 0.9)
    # clipping: only the body group, with its own norm, once per body update (iterations 0, 3, 6, 9)
    n_body = len(list(trainer.method.body.parameters()))
    assert clips == [(n_body, 0.05)] * 4
    # each schedule counts its group's own updates: 4 for body, 10 for head
    assert trainer.total_updates == {"body": 4, "head": 10}
    assert trainer.schedulers["body"].last_epoch == 4 and trainer.schedulers["head"].last_epoch == 10
    assert body.param_groups[0]["lr"] == pytest.approx(0.02 * lr_lambda("linear", 2, 4)(4))
    assert head.param_groups[0]["lr"] == pytest.approx(0.01 * lr_lambda("cosine", 0, 10)(10))
    # the body's weights change at its own iterations only
    hist, n = trainer.method.weight_history, sum(p.numel() for p in trainer.method.body.parameters())
    changed = [not torch.equal(hist[i + 1][:n], hist[i][:n]) for i in range(9)]
    assert changed == [i % 3 == 0 for i in range(9)]
    # exact resume from the checkpoint at 5: optimizer states (momentum, Adam moments) and schedules restored
    middle = trainer.run_dir / "checkpoints" / "checkpoint-000005"
    recipe = write_recipe(tmp_path / "spec-resumed.yaml", tmp_path / "spec-resumed", {**SPEC_TRAIN, "checkpoint_every": 5}, toy)
    resumed = trun.prepare_run(recipe, [], str(middle), evaluator=toy_evaluator)[0]
    resumed.train(resume=str(middle))
    assert resumed.schedulers["body"].last_epoch == 4
    assert max_diff(final_weights(resumed.run_dir), final_weights(trainer.run_dir)) <= 1e-6


def test_optimizer_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'body'"):
        run_inprocess(tmp_path, "bad", {"max_steps": 1, "optimizers": {"bdy": {"learning_rate": 0.1}}}, {"two_groups": True})
    with pytest.raises(ConfigError, match="betas"):
        run_inprocess(tmp_path, "bad2", {"max_steps": 1, "optimizers": {"body": {"betas": [0.9, 1.5]}}}, {"two_groups": True})
    with pytest.raises(ConfigError, match="amsgrd"):
        run_inprocess(tmp_path, "bad5", {"max_steps": 1, "optimizers": {"model": {"options": {"amsgrd": True}}}})
    with pytest.raises(ConfigError, match="learning_rate instead"):
        run_inprocess(tmp_path, "bad6", {"max_steps": 1, "optimizers": {"model": {"options": {"lr": 0.1}}}})
    with pytest.raises(ConfigError, match="makes 1 updates"):
        run_inprocess(tmp_path, "bad3", {"max_steps": 3, "optimizers": {"body": {"lr_scheduler": "cosine", "warmup_steps": 2}}},
                      {"two_groups": True, "body_every": 3})


# --------------------------------------------------------------------------- Prodigy (optional prodigyopt)


class StubProdigy(torch.optim.Optimizer):
    """Stands in for prodigyopt.Prodigy: Adam-like, with a step-size estimate ``d`` in each param group
    (as Prodigy keeps it) that grows every step, so a resume that lost it would train differently."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                 use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=float("inf"),
                 fsdp_in_use=False, slice_p=1):
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple, d=d0,
                        d_coef=d_coef, k=0, use_bias_correction=use_bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["d"] = group["d"] * 1.5 + 1e-3 * group["d_coef"]
            group["k"] += 1
            beta1, _ = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.add_(avg.sign(), alpha=-group["lr"] * group["d"])


def stub_prodigyopt(monkeypatch):
    import types

    module = types.ModuleType("prodigyopt")
    module.Prodigy = StubProdigy
    monkeypatch.setitem(sys.modules, "prodigyopt", module)


PRODIGY_TRAIN = {
    "max_steps": 8,
    "checkpoint_every": 4,
    "optimizer": "prodigy",  # every group's default ...
    "learning_rate": 1.0,
    "weight_decay": 1e-4,
    # ... but the head keeps AdamW with its own learning rate
    "optimizers": {"body": {"options": {"d_coef": 2.0, "use_bias_correction": True}},
                   "head": {"optimizer": "adamw", "learning_rate": 0.01}},
}


def test_prodigy_missing_package_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` fails, installed or not
    for train in ({"max_steps": 1, "optimizer": "prodigy"}, {"max_steps": 1, "optimizers": {"model": {"optimizer": "prodigy"}}}):
        with pytest.raises(ConfigError, match=r"pip install prodigyopt") as err:
            run_inprocess(tmp_path, "no-prodigy", train)
        assert "adamw" in str(err.value)
        assert not (tmp_path / "no-prodigy").exists(), "fails before the run folder (or a teacher) is touched"
    from fastgen.trainers.engine.optim import build_optimizer, resolve_spec

    spec = resolve_spec("g", None, None, tbase.TrainConfig(optimizer="prodigy"))
    with pytest.raises(ConfigError, match=r"pip install prodigyopt"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], spec, "g")


def test_prodigy_wiring_per_group_and_exact_resume_with_a_stub(tmp_path, monkeypatch):
    stub_prodigyopt(monkeypatch)
    toy = {"two_groups": True, "body_every": 2}
    trainer = run_inprocess(tmp_path, "prodigy", PRODIGY_TRAIN, toy)
    body, head = trainer.optimizers["body"], trainer.optimizers["head"]
    assert type(body) is StubProdigy and type(head) is torch.optim.AdamW
    group = body.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1.0, (0.9, 0.999), 1e-8, 1e-4)
    assert group["d_coef"] == 2.0 and group["use_bias_correction"] is True and group["k"] == 4
    assert head.param_groups[0]["lr"] == 0.01
    # the optimizer state dict round trip: d, k and the moments come back from the checkpoint at 4
    middle = trainer.run_dir / "checkpoints" / "checkpoint-000004"
    saved = torch.load(middle / ckpt.OPTIMIZER_FILE, weights_only=True)["optimizers"]["body"]
    assert saved["param_groups"][0]["k"] == 2 and saved["param_groups"][0]["d"] > 1e-3
    recipe = write_recipe(tmp_path / "prodigy-resumed.yaml", tmp_path / "prodigy-resumed", PRODIGY_TRAIN, toy)
    resumed = trun.prepare_run(recipe, [], str(middle), evaluator=toy_evaluator)[0]
    resumed.train(resume=str(middle))
    assert resumed.optimizers["body"].param_groups[0]["d"] == group["d"]
    assert max_diff(final_weights(resumed.run_dir), final_weights(trainer.run_dir)) <= 1e-6


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None, reason="prodigyopt is not installed")
def test_real_prodigy_trains_and_resumes_exactly(tmp_path):
    from prodigyopt import Prodigy

    train = {**PRODIGY_TRAIN, "optimizers": {"model": {"options": {"safeguard_warmup": True}}}}
    trainer = run_inprocess(tmp_path, "real-prodigy", train)
    opt = trainer.optimizers["model"]
    assert type(opt) is Prodigy and opt.param_groups[0]["safeguard_warmup"] is True
    assert opt.param_groups[0]["d"] > 1e-6, "Prodigy's step size estimate moved off d0"
    middle = trainer.run_dir / "checkpoints" / "checkpoint-000004"
    recipe = write_recipe(tmp_path / "real-resumed.yaml", tmp_path / "real-resumed", train)
    resumed = trun.prepare_run(recipe, [], str(middle), evaluator=toy_evaluator)[0]
    resumed.train(resume=str(middle))
    assert resumed.optimizers["model"].param_groups[0]["d"] == opt.param_groups[0]["d"]
    assert max_diff(final_weights(resumed.run_dir), final_weights(trainer.run_dir)) <= 1e-6


def test_prompt_only_method_trains_and_resumes_exactly(tmp_path):
    data = {"source": "prompts", "num_samples": 40}
    straight = run_inprocess(tmp_path, "prompts", {"max_steps": 6}, {"record": True}, method="toy-prompts", data=data)
    dataset = straight.method.train_dataset()
    assert len(dataset) == 40 and set(dataset[0]) == {"caption", "index"}  # prompts only: no image data set
    first = straight.method.weight_history[0]
    assert not torch.equal(first, straight.method.flat_weights())  # it trained
    half = write_recipe(tmp_path / "p-half.yaml", tmp_path / "p-half", {**BASE_TRAIN, "max_steps": 3}, {}, "toy-prompts", data=data)
    trun.prepare_run(half, [])[0].train()
    whole = write_recipe(tmp_path / "p-half.yaml", tmp_path / "p-half", {**BASE_TRAIN, "max_steps": 6}, {}, "toy-prompts", data=data)
    resumed = trun.prepare_run(whole, [], "latest")[0]
    resumed.train(resume="latest")
    assert max_diff(final_weights(resumed.run_dir), final_weights(straight.run_dir)) <= 1e-6
    # the default data source of a prompt-only method is the prompt list (digits captions)
    cfg, _ = trun.load_run_config("toy-prompts")
    assert cfg.data.source == "prompts"
    with pytest.raises(ConfigError, match="trains on prompts"):
        run_inprocess(tmp_path, "p-digits", {"max_steps": 1}, {}, method="toy-prompts", data={"source": "digits"})


# --------------------------------------------------------------------------- 6. DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ddp(recipe: Path, out: Path):
    """Train ``recipe`` with ``accelerate launch`` on 2 CPU processes (gloo); per rank: final weights, what it saw."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(TESTS / "ddp_train_script.py"), str(recipe), str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    from safetensors.torch import load_file

    weights = [load_file(str(out / f"weights-rank{i}.safetensors")) for i in (0, 1)]
    seen = [json.loads((out / f"seen-rank{i}.json").read_text()) for i in (0, 1)]
    return weights[0], weights[1], seen[0], seen[1]


# about 10 s (two process start-ups): part of the default suite
def test_ddp_two_processes_average_gradients_over_sharded_data(tmp_path, monkeypatch):
    train = {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 2, "checkpoint_every": 2, "sample_every": 2, "eval_every": 2}
    toy = {"dropout": 0.0, "input_noise": 0.0, "record": True, "num_items": 48}
    recipe = write_recipe(tmp_path / "ddp.yaml", tmp_path / "ddp", train, toy)
    out = tmp_path / "ddp-out"
    w0, w1, seen0, seen1 = launch_ddp(recipe, out)
    assert seen0["world_size"] == seen1["world_size"] == 2
    assert max_diff(w0, w1) == 0.0  # ranks end identical
    for a, b in zip(seen0["seen"], seen1["seen"]):
        assert not set(a) & set(b)  # each micro-batch: disjoint shards

    # averaged gradients == one process on the global batch (4 per rank x 2 ranks, 2 micro-batches)
    glob = run_inprocess(tmp_path, "global", {**train, "batch_size": 8}, toy)
    assert max_diff(w0, glob.method.checkpoint_state_dict()) <= 1e-5
    assert [sorted(a + b) for a, b in zip(seen0["seen"], seen1["seen"])] == [sorted(s) for s in glob.method.seen]

    # ... and != one process training on rank 0's shard alone
    monkeypatch.setattr(tbase, "ShardedBatchSampler", lambda n, b, w, r, **kw: ShardedBatchSampler(n, b, 2, 0, **kw))
    alone = run_inprocess(tmp_path, "rank0-alone", train, toy)
    assert alone.method.seen == seen0["seen"]
    assert max_diff(w0, alone.method.checkpoint_state_dict()) > 1e-4

    cdir = tmp_path / "ddp" / "checkpoints"
    assert ckpt.read_latest(cdir) == "checkpoint-000004"
    assert {"rng.pt", "rng-rank1.pt"} <= {p.name for p in (cdir / "checkpoint-000004").iterdir()}
    assert (tmp_path / "ddp" / "samples" / "step-000004.png").is_file()


def test_ddp_two_processes_prompt_only_method(tmp_path):
    train = {"max_steps": 3, "batch_size": 4, "checkpoint_every": 3}
    toy = {"record": True, "dropout": 0.0, "input_noise": 0.0}  # no per-rank randomness: comparable to one process
    recipe = write_recipe(tmp_path / "ddp-p.yaml", tmp_path / "ddp-p", train, toy, "toy-prompts",
                          data={"source": "prompts", "num_samples": 32})
    out = tmp_path / "ddp-p-out"
    w0, w1, seen0, seen1 = launch_ddp(recipe, out)
    assert seen0["world_size"] == 2 and max_diff(w0, w1) == 0.0
    assert all(not set(a) & set(b) for a, b in zip(seen0["seen"], seen1["seen"]))
    glob = run_inprocess(tmp_path, "p-global", {**train, "batch_size": 8}, toy, method="toy-prompts",
                         data={"source": "prompts", "num_samples": 32})
    assert max_diff(w0, glob.method.checkpoint_state_dict()) <= 1e-5
    assert [sorted(a + b) for a, b in zip(seen0["seen"], seen1["seen"])] == [sorted(x) for x in glob.method.seen]


# --------------------------------------------------------------------------- 7. run folder contents


def test_samples_metrics_config_and_tensorboard(tmp_path):
    trainer = run_inprocess(
        tmp_path, "full",
        {"max_steps": 6, "sample_every": 3, "eval_every": 3, "checkpoint_every": 2, "keep_checkpoints": 2, "log_with": "tensorboard", "log_every": 2},
    )
    run_dir = trainer.run_dir
    from PIL import Image

    for step in (3, 6):
        img = Image.open(run_dir / "samples" / f"step-{step:06d}.png")
        assert img.size == (4 * 10 + 2, 10 + 2)  # 4 default prompts of 8x8 images, 2px padding
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["eval_mse"] > 0 for r in rows)
    text = (run_dir / "config.yaml").read_text()
    assert text.startswith("method: toy\n")
    saved = yaml.safe_load(text)
    assert saved["train"]["max_steps"] == 6 and "toy" in saved
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-000004", "checkpoint-000006"]
    # sampling/evaluation must not disturb training randomness: same weights without them
    plain = run_inprocess(tmp_path, "plain", {"max_steps": 6})
    assert max_diff(final_weights(run_dir), final_weights(plain.run_dir)) == 0.0


def test_unknown_keys_get_suggestions(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "x")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        trun.load_run_config(recipe, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="did you mean 'toy.dropout'"):
        trun.load_run_config(recipe, ["toy.dropot=0.5"])
    cfg, cls = trun.load_run_config("toy", ["train.max_steps=3", "toy.hidden=8"])
    assert cls.name == "toy" and cfg.train.max_steps == 3 and cfg.toy.hidden == 8 and cfg.output_dir == "runs/toy"
    with pytest.raises(ConfigError, match="unknown method 'tyo'; did you mean 'toy'"):
        trun.load_run_config("tyo")
    with pytest.raises(ConfigError, match="must be >= 1"):
        trun.load_run_config("toy", ["train.batch_size=0"])


# --------------------------------------------------------------------------- building blocks


def test_sampler_is_deterministic_sharded_and_resumable():
    s = ShardedBatchSampler(10, 2, world_size=2, rank=0, seed=3)
    t = ShardedBatchSampler(10, 2, world_size=2, rank=1, seed=3)
    assert s.batches_per_epoch == 2
    epoch0 = s.indices(0) + t.indices(0) + s.indices(1) + t.indices(1)
    assert len(set(epoch0)) == 8  # one epoch: no repeats (tail of 2 dropped)
    assert s.indices(2) != s.indices(0)  # a new permutation per epoch
    it = iter(ShardedBatchSampler(10, 2, 2, 0, seed=3, start=3))
    assert next(it) == s.indices(3)
    with pytest.raises(Exception, match="fewer than one global micro-batch"):
        ShardedBatchSampler(3, 2, world_size=2)


def test_lr_schedules():
    f = lr_lambda("constant_with_warmup", 4, 100)
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    g = lr_lambda("cosine", 0, 10)
    assert g(0) == 1.0 and abs(g(5) - 0.5) < 1e-9 and g(10) == 0.0
    assert lr_lambda("linear", 0, 10)(5) == 0.5 and lr_lambda("constant", 5, 10)(0) == 1.0


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    ckpt.write_torch(tmp_path / "rng.pt", state)
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(ckpt.load_torch(tmp_path / "rng.pt"))  # weights_only=True
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_ema_helper():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], before + 1.0)
    state = ema.state_dict("ema.")
    assert set(state) == {"ema.shadow.weight", "ema.shadow.bias", "ema.num_updates"}
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(state, "ema.")
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with ema.swapped():
        assert torch.allclose(net.weight, before + 1.0)
    assert torch.allclose(net.weight, before + 2.0)
    t = [torch.zeros(2)]
    ema_update_(t, [torch.ones(2)], decay=0.75)
    assert torch.allclose(t[0], torch.full((2,), 0.25))
    assert EMA(net, decay=0.999, warmup=True).current_decay() == pytest.approx(0.1)
