"""DMD and DisBack end to end on the tiny random SD teacher of tests/tiny_models.py:

* ``fastgen train disback`` -> ``fastgen export`` -> stock ``DiffusionPipeline.from_pretrained`` in a fresh process
  that never imports fastgen, one step, reproducing the generator's in-process images;
* a real SIGKILL in stage 2 and ``--resume latest``: the path position and the loaded node follow from the
  iteration, so the resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fastgen.trainers.engine import checkpoint as ckpt
from test_lcd_e2e import FAST, env, fastgen, fastgen_cmd, final_state, max_diff, ok, assert_one_step_export_reproduces_run, train_and_kill
from tiny_models import make_tiny_sd

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "fastgen" / "recipes" / "disback-digits.yaml")
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three"]
# stage 1: iterations 0-3 (nodes at 2 and 4); stage 2 from 4: node 1 for updates 0-1, then the teacher
SMALL = ["disback.path_nodes=2", "disback.degradation_steps=4", "disback.interval=2", "disback.fake_updates_per_generator_update=1",
         "data.num_samples=8", "train.lr_scheduler=constant"]  # the resume test changes max_steps, which a cosine schedule reads

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("disback-e2e") / "tiny-sd", prediction_type="epsilon")


def train_args(teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "disback", "--config", RECIPE, f"teacher.path={teacher}", f"output_dir={run_dir}", *FAST, *SMALL, *extra]


@pytest.mark.slow
@pytest.mark.ci
def test_export_loads_in_stock_diffusers_and_reproduces_the_generator(teacher, tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "export"
    ok(fastgen(*train_args(teacher, run_dir, "train.max_steps=8")))
    assert sorted(p.name for p in (run_dir / "disback-path").iterdir()) == ["node-001.safetensors", "node-002.safetensors"]
    assert_one_step_export_reproduces_run(run_dir, out_dir, PROMPTS, 999, tmp_path)


@pytest.mark.slow
@pytest.mark.ci
def test_resume_after_sigkill_in_stage_two_matches_uninterrupted_run(teacher, tmp_path):
    common = ["train.checkpoint_every=1", "train.keep_checkpoints=0"]
    killed = tmp_path / "killed"
    killed_at = train_and_kill(train_args(teacher, killed, "train.max_steps=2000", *common), killed, at_least=5, timeout=180)
    assert killed_at >= 5  # in stage 2, with node 1 in the real-score slot
    at_kill = ckpt.load_model_state(killed / "checkpoints" / ckpt.checkpoint_name(killed_at))
    final = killed_at + 3
    full = tmp_path / "full"
    p_full = subprocess.Popen(fastgen_cmd(*train_args(teacher, full, f"train.max_steps={final}", *common)), cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = fastgen(*train_args(teacher, killed, f"train.max_steps={final}", *common), "--resume", "latest", timeout=300)
    out, _ = p_full.communicate(timeout=300)
    ok(r)
    assert p_full.returncode == 0, out.decode(errors="replace")[-3000:]
    a, b = final_state(full), final_state(killed)
    assert {k.split(".")[0] for k in a} == {"generator", "fake", "ema"}  # the recipe keeps an EMA of the generator
    assert max_diff(a, b) <= 1e-6
    assert max_diff(a, at_kill) > 1e-6
