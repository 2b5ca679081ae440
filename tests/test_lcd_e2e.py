"""LCD end to end through the command line, on the tiny random SD teacher of tests/tiny_models.py.

* ``fastgen train lcd --config ...`` -> ``fastgen export`` -> ``fastgen sample`` (full student and LoRA);
* exact resume of an LCD run after a real SIGKILL (student, EMA target, optimizer, the RNG streams
  of w / timestep / noise sampling, data position);
* two-process DDP (``accelerate launch``) of LCD: both ranks end with identical, trained weights;
* bad input through the CLI: exit code 2 and a message that names the problem and the fix.

The generic trainer (toy method) and the export round trip through stock diffusers are covered
in test_trainer.py and test_export.py; these tests run the real LCD recipe through the real
entry points in fresh processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastgen.trainers.engine import checkpoint as ckpt
from tiny_models import make_tiny_sd

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = str(ROOT / "fastgen" / "recipes" / "lcd-digits.yaml")
PROMPT = "a red handwritten digit seven"

# Small and quiet: no sample grids, no evaluation, no trackers, no progress bar.
FAST = [
    "train.batch_size=2",
    "train.sample_every=0",
    "train.eval_every=0",
    "train.log_with=none",
    "train.progress=false",
    "sample.eval_samples=4",
]
TINY_PX = 16  # the tiny SD teacher's default resolution (8x8 latents, VAE factor 2)


STOCK_SAMPLE = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
out_dir, images_path, prompts, steps, guidance, size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
pipe = DiffusionPipeline.from_pretrained(out_dir)
pipe.set_progress_bar_config(disable=True)
images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
              height=size, width=size, output_type="pt").images
torch.save(images, images_path)
print(json.dumps({"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                  "timesteps": pipe.scheduler.timesteps.tolist(),
                  "fastgen_imported": any(m == "fastgen" or m.startswith("fastgen.") for m in sys.modules)}))
"""


def stock_sample(out_dir: Path, prompts: list[str], steps: int, guidance: float, work: Path, size: int = TINY_PX) -> tuple[dict, torch.Tensor]:
    """Sample an export with stock ``DiffusionPipeline.from_pretrained`` in a fresh process that never imports fastgen
    (seed 0); returns what it reports (pipeline and scheduler class, timesteps, whether fastgen got imported) and the images."""
    images_path = work / "stock-images.pt"
    proc = subprocess.run([sys.executable, "-c", STOCK_SAMPLE, str(out_dir), str(images_path), json.dumps(prompts), str(steps),
                           str(guidance), str(size)], capture_output=True, text=True, cwd=str(work),
                          env=dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(images_path, weights_only=True)


def assert_one_step_export_reproduces_run(run_dir: Path, out_dir: Path, prompts: list[str], timestep: int, work: Path) -> torch.Tensor:
    """``fastgen export`` of a one-step run, then stock diffusers in a fresh process: a one-step DDIMScheduler at
    ``timestep`` whose images equal the run's own one-step samples; returns the stock images."""
    from fastgen.trainers.engine.run import load_method_from_run

    ok(fastgen("export", run_dir, out_dir))
    got, images = stock_sample(out_dir, prompts, 1, 1.0, work)
    assert got == {"class": "StableDiffusionPipeline", "scheduler": "DDIMScheduler", "timesteps": [timestep], "fastgen_imported": False}
    method, _ = load_method_from_run(run_dir)
    ours = method.sample(prompts, 1, torch.Generator().manual_seed(0))
    assert images.shape == ours.shape == (len(prompts), 3, TINY_PX, TINY_PX)
    assert float((images - ours).abs().max()) < 1e-5
    return images


def grid_size(prompts: int, per_prompt: int, px: int = TINY_PX) -> tuple[int, int]:
    """PIL (width, height) of `fastgen sample`'s grid: rows = prompts, 2 px padding, upscaled to >= 128 px."""
    up = max(1, 128 // px)
    return ((per_prompt * (px + 2) + 2) * up, (prompts * (px + 2) + 2) * up)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    e["HF_HUB_OFFLINE"] = "1"
    e["TOKENIZERS_PARALLELISM"] = "false"
    return e


def fastgen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastgen.cli", *map(str, args)]


def fastgen(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(fastgen_cmd(*args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{(r.stdout + r.stderr)[-4000:]}"
    return r


def train_args(teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "lcd", "--config", RECIPE, f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST, *extra]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def subset(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state(ckpt.find_checkpoint(run_dir, "latest"))


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def assert_not_blank(path: Path) -> None:
    from PIL import Image
    import numpy as np

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert arr.std() > 1.0, f"{path} is a blank image"


def train_and_kill(args: list[str], run_dir: Path, at_least: int, timeout: float) -> int:
    """Run ``fastgen ARGS`` and SIGKILL it as soon as RUN_DIR's latest checkpoint is at step >= ``at_least``;
    returns the step of that checkpoint (the kill lands between checkpoints, mid-training)."""
    p = subprocess.Popen(fastgen_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    try:
        while True:
            name = latest.read_text().strip() if latest.exists() else ""
            if name and int(name.split("-")[1]) >= at_least:
                break
            assert p.poll() is None, p.communicate()[0].decode(errors="replace")[-3000:]
            assert time.time() < deadline, f"no checkpoint within {timeout} s"
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    return int(latest.read_text().strip().split("-")[1])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("lcd-e2e") / "tiny-sd", prediction_type="epsilon")


# --------------------------------------------------------------------------- 1. CLI end to end


@pytest.mark.slow
@pytest.mark.ci
def test_cli_train_export_sample_full_student(teacher, tmp_path):
    run_dir, out_dir, grid = tmp_path / "run", tmp_path / "export", tmp_path / "grid.png"
    r = ok(fastgen(*train_args(teacher, run_dir, "train.max_steps=4", "train.checkpoint_every=2")))
    assert f"run folder: {run_dir}" in r.stdout

    text = (run_dir / "config.yaml").read_text()
    assert text.startswith("method: lcd\n")
    saved = yaml.safe_load(text)
    assert saved["train"]["max_steps"] == 4 and saved["train"]["batch_size"] == 2
    assert saved["teacher"]["path"] == str(teacher) and saved["lcd"]["w_max"] == 4.0  # recipe value kept
    assert ckpt.read_latest(run_dir / "checkpoints") == "checkpoint-000004"
    state = json.loads((run_dir / "checkpoints" / "checkpoint-000004" / ckpt.STATE_FILE).read_text())
    assert state["method"] == "lcd" and state["step"] == 4 and state["data_position"] == 4

    r = ok(fastgen("export", run_dir, out_dir))
    assert str(out_dir) in r.stdout
    assert json.loads((out_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    info = json.loads((out_dir / "fastgen_export.json").read_text())
    assert info["export"] == "pipeline" and info["unet_weights"] == "ema_target" and info["time_cond_proj_dim"] == 256
    # the exported UNet is the EMA target of the latest checkpoint (not the online student, not the teacher)
    trained = final_state(run_dir)
    unet = load_file(str(out_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_diff(unet, subset(trained, "target.")) == 0.0
    assert max_diff(unet, subset(trained, "student.")) > 0.0
    assert float(unet["time_embedding.cond_proj.weight"].abs().max()) > 0.0  # the w embedding was trained

    r = ok(fastgen("sample", out_dir, "--prompt", PROMPT, "--steps", "4", "--out", grid))
    assert r.stdout.strip().splitlines()[-1] == f"pipeline: 4 images, 4 steps -> {grid}"
    assert image_size(grid) == grid_size(prompts=1, per_prompt=4)
    assert_not_blank(grid)


@pytest.mark.slow
@pytest.mark.ci
def test_cli_train_export_sample_lora(teacher, tmp_path):
    run_dir, out_dir, grid = tmp_path / "lora-run", tmp_path / "lora-export", tmp_path / "lora.png"
    ok(fastgen(*train_args(teacher, run_dir, "train.max_steps=4", "lcd.lora=true", "lcd.lora_rank=2", "lcd.lora_alpha=2")))
    assert (run_dir / "config.yaml").read_text().startswith("method: lcd\n")
    trained = final_state(run_dir)
    assert trained and all(k.startswith("lora.") for k in trained)  # adapters only, no full UNet copies

    ok(fastgen("export", run_dir, out_dir))
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    assert not (out_dir / "model_index.json").exists()
    info = json.loads((out_dir / "fastgen_export.json").read_text())
    assert info["base_model_path"] == str(teacher) and info["guidance_scale"] == 1.0
    lora = load_file(str(out_dir / "pytorch_lora_weights.safetensors"))
    ups = {k: v for k, v in lora.items() if ".lora_B." in k}
    assert ups and max(float(v.abs().max()) for v in ups.values()) > 0.0  # zero-initialised, so trained
    for k, v in ups.items():  # the exported adapters are the checkpoint's
        ck = "lora." + k[len("unet."):].replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(v, trained[ck]), k

    prompts = [PROMPT, "a blue handwritten digit three"]
    r = ok(fastgen("sample", out_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--steps", "4",
                   "--num-images", "3", "--out", grid))
    assert r.stdout.strip().splitlines()[-1] == f"lora: 6 images, 4 steps -> {grid}"
    assert image_size(grid) == grid_size(prompts=2, per_prompt=3)
    assert_not_blank(grid)


# --------------------------------------------------------------------------- 2. exact resume after SIGKILL


@pytest.mark.slow
@pytest.mark.ci
def test_lcd_resume_after_sigkill_matches_uninterrupted_run(teacher, tmp_path):
    # caption dropout + sampled w / timesteps / noise: all drawn from the global RNG, so equality
    # needs the RNG streams, the EMA target, AdamW's state and the data position restored.
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=0", "train.lr_scheduler=constant",
              "lcd.caption_dropout=0.2", "lcd.ema_decay=0.5"]
    killed = tmp_path / "killed"
    # The kill must land between checkpoints: a far-away max_steps keeps the process training (it is
    # killed long before). With a constant LR, max_steps does not change the trajectory, so the run
    # is resumed with the final step count of the reference run.
    killed_at = train_and_kill(train_args(teacher, killed, "train.max_steps=2000", *common), killed, at_least=2, timeout=120)
    assert 2 <= killed_at < 2000
    at_kill = ckpt.load_model_state(killed / "checkpoints" / ckpt.checkpoint_name(killed_at))
    final = max(8, killed_at + 2)  # normally 8 (killed at 2..6); at least one checkpoint after the resume

    full = tmp_path / "full"
    p_full = subprocess.Popen(
        fastgen_cmd(*train_args(teacher, full, f"train.max_steps={final}", *common)),
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    r = fastgen(*train_args(teacher, killed, f"train.max_steps={final}", *common), "--resume", "latest")
    out, _ = p_full.communicate(timeout=180)
    ok(r)
    assert p_full.returncode == 0, out.decode(errors="replace")[-3000:]

    state = json.loads((killed / "checkpoints" / ckpt.checkpoint_name(final) / ckpt.STATE_FILE).read_text())
    assert state["step"] == final and state["data_position"] == final
    a, b = final_state(full), final_state(killed)
    assert {k.split(".")[0] for k in a} == {"student", "target"}
    assert max_diff(a, b) <= 1e-6  # every tensor: online student and EMA target
    # not vacuous: training after the resume point moved both networks, and the target lags the student
    assert max_diff(subset(a, "student."), subset(at_kill, "student.")) > 1e-6
    assert max_diff(subset(a, "target."), subset(at_kill, "target.")) > 1e-6
    assert max_diff(subset(a, "target."), subset(a, "student.")) > 1e-7


# --------------------------------------------------------------------------- 3. DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ci
def test_lcd_ddp_two_processes_end_identical(teacher, tmp_path):
    run_dir, out = tmp_path / "ddp-run", tmp_path / "ddp-out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(TESTS / "lcd_ddp_script.py"), str(out), RECIPE,
        f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST, "train.max_steps=3", "train.checkpoint_every=0",
        "lcd.caption_dropout=0.2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    infos = [json.loads((out / f"info-rank{i}.json").read_text()) for i in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world_size"] == 2 and i["step"] == 3 for i in infos)
    w0, w1 = (load_file(str(out / f"rank{i}.safetensors")) for i in (0, 1))
    i0, i1 = (load_file(str(out / f"initial-rank{i}.safetensors")) for i in (0, 1))
    assert max_diff(i0, i1) == 0.0  # same start (seeded build + broadcast from rank 0)
    assert max_diff(w0, w1) <= 1e-7  # averaged gradients: every rank takes the same step
    assert max_diff(subset(w0, "student."), subset(i0, "student.")) > 1e-6  # and it did train
    assert max_diff(subset(w0, "target."), subset(i0, "target.")) > 1e-6
    # rank 0's checkpoint holds the same weights; every rank saved its RNG state
    cdir = run_dir / "checkpoints"
    assert ckpt.read_latest(cdir) == "checkpoint-000003"
    assert max_diff(ckpt.load_model_state(cdir / "checkpoint-000003"), w0) == 0.0
    assert {"rng.pt", "rng-rank1.pt"} <= {p.name for p in (cdir / "checkpoint-000003").iterdir()}
    assert (run_dir / "config.yaml").read_text().startswith("method: lcd\n")


# --------------------------------------------------------------------------- 4. bad input


def cli_main(capsys, *args: str) -> tuple[int, str]:
    """``fastgen ARGS`` in this process (the same ``main`` the console script calls): (exit code, stderr)."""
    from fastgen.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_resume_without_checkpoint(teacher, tmp_path, capsys):
    run_dir = tmp_path / "never-trained"
    code, err = cli_main(capsys, *train_args(teacher, run_dir, "train.max_steps=2"), "--resume", "latest")
    assert code == 2
    assert err.startswith("error: no finished checkpoint in run folder")
    assert str(run_dir) in err and "start the training without --resume" in err
    assert not run_dir.exists(), "a refused resume writes nothing"


def test_cli_export_of_run_without_finished_checkpoint(teacher, tmp_path, capsys):
    from fastgen.config import save_config
    from fastgen.trainers.engine.run import load_run_config

    run_dir, out_dir = tmp_path / "run", tmp_path / "export"
    # the run folder as `fastgen train` starts it (config.yaml, method first), killed before any checkpoint
    cfg, _ = load_run_config(RECIPE, [f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml", header={"method": "lcd"})
    assert (run_dir / "config.yaml").is_file()
    # a save killed half-way: weights written, trainer_state.json not, never renamed
    half = run_dir / "checkpoints" / ".tmp-checkpoint-000002"
    half.mkdir(parents=True)
    ckpt.write_safetensors(half / ckpt.MODEL_FILE, {"w": torch.zeros(2)})
    code, err = cli_main(capsys, "export", run_dir, out_dir)
    assert code == 2
    assert "no finished checkpoint" in err and str(run_dir) in err and "train.checkpoint_every" in err
    assert not out_dir.exists() and not list(tmp_path.glob(".export*")), "a failed export leaves nothing"

    # a folder that is not a run at all
    code, err = cli_main(capsys, "export", tmp_path / "nothing", out_dir)
    assert code == 2 and "is not a fastgen run folder" in err and "config.yaml" in err
    assert not out_dir.exists()


def test_cli_unknown_recipe_key_suggests_the_right_one(teacher, tmp_path, capsys):
    code, err = cli_main(capsys, *train_args(teacher, tmp_path / "typo", "lcd.w_maxx=3"))
    assert code == 2
    assert "unknown config key 'lcd.w_maxx'" in err and "did you mean 'lcd.w_max'?" in err
    assert not (tmp_path / "typo").exists()
    # the installed console script exits with the same code and message
    script = Path(sys.executable).with_name("fastgen")
    cmd = [str(script)] if script.is_file() else fastgen_cmd()
    r = subprocess.run([*cmd, *train_args(teacher, tmp_path / "typo", "train.max_stepz=3")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "did you mean 'train.max_steps'?" in r.stderr and "Traceback" not in r.stderr


def test_cli_sample_of_a_folder_that_is_no_export(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    grid = tmp_path / "grid.png"
    code, err = cli_main(capsys, "sample", junk, "--prompt", PROMPT, "--out", grid)
    assert code == 2
    assert "is neither a diffusers pipeline folder (model_index.json) nor a LoRA export" in err
    assert "fastgen export" in err and str(junk) in err
    code, err = cli_main(capsys, "sample", tmp_path / "missing", "--prompt", PROMPT, "--out", grid)
    assert code == 2 and "does not exist" in err
    assert not grid.exists()
