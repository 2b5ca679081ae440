"""SCott end to end in fresh processes, on the tiny random SD teacher of tests/tiny_models.py:

* ``fastgen train scott`` -> ``fastgen export`` -> stock ``DiffusionPipeline.from_pretrained`` in a fresh
  process that never imports fastgen, reproducing the run's own sampler;
* exact resume after a real SIGKILL (student, EMA target, discriminator heads + LoRA, both optimizers,
  RNG streams, data position);
* two-process DDP (``accelerate launch``): identical weights on both ranks, discriminator included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgen.trainers.engine import checkpoint as ckpt
from test_lcd_e2e import FAST, _free_port, env, fastgen, fastgen_cmd, final_state, max_diff, ok, stock_sample, subset, train_and_kill
from tiny_models import make_tiny_sd

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = str(ROOT / "fastgen" / "recipes" / "scott-digits.yaml")
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three"]
# a small discriminator with its own LoRA, R1 and an SDE teacher: every stateful part of SCott is exercised
SMALL = ["scott.adv_start_step=1", "scott.disc_head_channels=8", "scott.disc_lora_rank=2", "scott.r1_weight=0.5",
         "scott.eta=0.5", "scott.num_substeps=2", "scott.caption_dropout=0.2"]

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("scott-e2e") / "tiny-sd", prediction_type="epsilon")


def train_args(teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "scott", "--config", RECIPE, f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST, *SMALL, *extra]


@pytest.mark.slow
@pytest.mark.ci
def test_train_export_and_load_in_stock_diffusers_in_a_fresh_process(teacher, tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "export"
    ok(fastgen(*train_args(teacher, run_dir, "train.max_steps=3")))
    state = final_state(run_dir)
    assert {k.split(".")[0] for k in state} == {"student", "target", "disc"}
    ok(fastgen("export", run_dir, out_dir))
    info = json.loads((out_dir / "fastgen_export.json").read_text())
    assert info["method"] == "scott" and info["num_substeps"] == 2 and info["unet_weights"] == "ema_target"
    assert not any("disc" in p.name for p in out_dir.rglob("*"))  # the discriminator is training-only

    got, images = stock_sample(out_dir, PROMPTS, 2, 3.0, tmp_path)
    assert {k: got[k] for k in ("class", "scheduler", "fastgen_imported")} == {
        "class": "StableDiffusionPipeline", "scheduler": "LCMScheduler", "fastgen_imported": False}

    from fastgen.trainers.engine.run import load_method_from_run

    method, _ = load_method_from_run(run_dir)
    ours = method.sample(PROMPTS, 2, torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert images.shape == ours.shape == (2, 3, 16, 16)
    assert float((images - ours).abs().max()) < 1e-4


@pytest.mark.slow
@pytest.mark.ci
def test_resume_after_sigkill_matches_uninterrupted_run(teacher, tmp_path):
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=0", "train.lr_scheduler=constant", "scott.ema_decay=0.5"]
    killed = tmp_path / "killed"
    killed_at = train_and_kill(train_args(teacher, killed, "train.max_steps=2000", *common), killed, at_least=2, timeout=180)
    at_kill = ckpt.load_model_state(killed / "checkpoints" / ckpt.checkpoint_name(killed_at))
    final = max(6, killed_at + 2)

    full = tmp_path / "full"
    p_full = subprocess.Popen(fastgen_cmd(*train_args(teacher, full, f"train.max_steps={final}", *common)), cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = fastgen(*train_args(teacher, killed, f"train.max_steps={final}", *common), "--resume", "latest", timeout=300)
    out, _ = p_full.communicate(timeout=300)
    ok(r)
    assert p_full.returncode == 0, out.decode(errors="replace")[-3000:]

    a, b = final_state(full), final_state(killed)
    assert {k.split(".")[0] for k in a} == {"student", "target", "disc"}
    assert max_diff(a, b) <= 1e-6
    # both optimizers' states (student and discriminator) are the same too
    opt_a, opt_b = (ckpt.load_torch(d / "checkpoints" / ckpt.checkpoint_name(final) / ckpt.OPTIMIZER_FILE) for d in (full, killed))
    assert set(opt_a["optimizers"]) == set(opt_b["optimizers"]) == {"student", "discriminator"}
    for name in ("student", "discriminator"):
        sa, sb = opt_a["optimizers"][name]["state"], opt_b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys() and sa
        assert max(float((sa[i]["exp_avg"] - sb[i]["exp_avg"]).abs().max()) for i in sa) <= 1e-6
    # not vacuous: the discriminator (heads and LoRA) trained after the resume point
    assert max_diff(subset(a, "disc."), subset(at_kill, "disc.")) > 1e-6
    assert max_diff(subset(a, "student."), subset(at_kill, "student.")) > 1e-6


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_two_processes_end_identical(teacher, tmp_path):
    run_dir, out = tmp_path / "ddp-run", tmp_path / "ddp-out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(TESTS / "lcd_ddp_script.py"), str(out), RECIPE,
           f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST, *SMALL, "train.max_steps=3", "train.checkpoint_every=0"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    w0, w1 = (load_file(str(out / f"rank{i}.safetensors")) for i in (0, 1))
    i0, i1 = (load_file(str(out / f"initial-rank{i}.safetensors")) for i in (0, 1))
    assert max_diff(i0, i1) == 0.0
    assert {k.split(".")[0] for k in w0} == {"student", "target", "disc"}
    assert max_diff(w0, w1) <= 1e-7
    assert max_diff(subset(w0, "disc."), subset(i0, "disc.")) > 1e-6  # the discriminator trained (steps 1, 2)
    assert max_diff(subset(w0, "student."), subset(i0, "student.")) > 1e-6
