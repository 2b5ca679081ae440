"""BOOT end to end on the tiny random SD teacher of tests/tiny_models.py, configured with a prompt file only:

* a whole run in process (checkpoints, sample grids, export) with the VAE encoder hooked: never called;
* exact resume after a real SIGKILL of ``fastgen train``;
* ``fastgen export`` -> stock ``DiffusionPipeline.from_pretrained`` in a fresh process that never imports
  fastgen, one step, reproducing the student's in-process images for the same seed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fastgen.trainers.engine import checkpoint as ckpt
from test_lcd_e2e import FAST, env, fastgen, fastgen_cmd, final_state, max_diff, ok, assert_one_step_export_reproduces_run, train_and_kill
from tiny_models import make_tiny_sd

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "fastgen" / "recipes" / "boot-digits.yaml")
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three"]

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("boot-e2e") / "tiny-sd", prediction_type="epsilon")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("boot-prompts") / "prompts.txt"
    path.write_text("# a DiffusionDB-style prompt list\n" + "\n".join(
        f"a {c} handwritten digit {d}" for c in ("red", "blue", "green") for d in ("one", "two", "three", "four")) + "\n")
    return path


def train_args(teacher: Path, prompts: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "boot", "--config", RECIPE, f"teacher.path={teacher}", f"data.prompts={prompts}", "data.num_samples=12",
            f"output_dir={run_dir}", "boot.num_intervals=8", *FAST, *extra]


@pytest.mark.slow
@pytest.mark.ci
def test_prompt_only_run_trains_checkpoints_and_exports_without_the_vae_encoder(teacher, prompt_file, tmp_path):
    from fastgen.trainers.engine.run import prepare_run
    from fastgen.workflows.export import export_run

    run_dir = tmp_path / "run"
    args = train_args(teacher, prompt_file, run_dir, "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=2")
    trainer, _ = prepare_run(RECIPE, args[4:])
    method = trainer.method
    before = {k: v.clone() for k, v in method.checkpoint_state_dict().items()}
    calls = []
    hook = method.teacher.vae.encoder.register_forward_hook(lambda *a: calls.append("encoder"))
    try:
        trainer.train()
        export_run(run_dir, tmp_path / "export")
    finally:
        hook.remove()
    assert calls == []  # no image, no VAE encoder: data-free
    assert ckpt.list_checkpoints(run_dir / "checkpoints") and (run_dir / "samples").is_dir()
    assert max_diff(final_state(run_dir), before) > 1e-6
    info = json.loads((tmp_path / "export" / "fastgen_export.json").read_text())
    assert info["method"] == "boot" and info["num_inference_steps"] == 1 and info["readout_timestep"] == 0


@pytest.mark.slow
@pytest.mark.ci
def test_resume_after_sigkill_matches_uninterrupted_run(teacher, prompt_file, tmp_path):
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=0", "boot.ema_decay=0.5"]
    killed = tmp_path / "killed"
    killed_at = train_and_kill(train_args(teacher, prompt_file, killed, "train.max_steps=2000", *common), killed, at_least=2,
                               timeout=180)
    at_kill = ckpt.load_model_state(killed / "checkpoints" / ckpt.checkpoint_name(killed_at))
    final = max(6, killed_at + 2)
    full = tmp_path / "full"
    p_full = subprocess.Popen(fastgen_cmd(*train_args(teacher, prompt_file, full, f"train.max_steps={final}", *common)), cwd=ROOT,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = fastgen(*train_args(teacher, prompt_file, killed, f"train.max_steps={final}", *common), "--resume", "latest", timeout=300)
    out, _ = p_full.communicate(timeout=300)
    ok(r)
    assert p_full.returncode == 0, out.decode(errors="replace")[-3000:]
    a, b = final_state(full), final_state(killed)
    assert {k.split(".")[0] for k in a} == {"student", "ema"}
    assert max_diff(a, b) <= 1e-6
    assert max_diff(a, at_kill) > 1e-6  # not vacuous: it trained after the resume point


@pytest.mark.slow
@pytest.mark.ci
def test_export_loads_in_stock_diffusers_and_reproduces_the_student(teacher, prompt_file, tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "export"
    ok(fastgen(*train_args(teacher, prompt_file, run_dir, "train.max_steps=3", "boot.ema_decay=0.5")))
    images = assert_one_step_export_reproduces_run(run_dir, out_dir, PROMPTS, 0, tmp_path)
    assert float(images.std()) > 0.01  # an image, not a constant
    # `fastgen sample` reads the folder's one step; more steps are refused with the reason
    r = ok(fastgen("sample", out_dir, "--prompt", PROMPTS[0], "--out", str(tmp_path / "grid.png")))
    assert "1 steps" in r.stdout and (tmp_path / "grid.png").is_file()
    bad = fastgen("sample", out_dir, "--prompt", PROMPTS[0], "--steps", "2")
    assert bad.returncode == 2 and "one-step generator" in bad.stderr
    # the exported weights are the EMA (export.weights: target), not the online student
    from safetensors.torch import load_file

    from fastgen.trainers.engine.run import load_method_from_run

    online = load_method_from_run(run_dir)[0].student.state_dict()

    exported = load_file(str(next((out_dir / "unet").glob("*.safetensors"))))
    key = next(k for k in exported if k in online and exported[k].is_floating_point())
    assert not torch.equal(exported[key], online[key])
