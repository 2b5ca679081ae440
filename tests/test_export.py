"""Export of LCD students (fastgen.pipelines) and their round trip through stock diffusers.

The exported folders are loaded in a FRESH Python process that never imports fastgen, with
``DiffusionPipeline.from_pretrained`` (+ ``load_lora_weights`` on the base pipeline for LoRA), and
its 4-step images are compared with ``LCD.sample`` for the same seed.

Tolerance 1e-4 on images in [0, 1]: both sides run the same float32 weights on the same CPU and draw
the same noise in the same order; the only differences are the LCMScheduler's float32
``alphas_cumprod`` against fastgen's float64 schedule (relative 1e-7 per coefficient) and the order
of a few float ops. Measured max difference: about 7e-7. A convention error (guidance off by one,
wrong timesteps, a dropped LoRA layer) moves pixels by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgen.pipelines import ExportError, ExportExistsError, read_run_metrics, render_model_card
from fastgen.pipelines import writer as pipeline_writer
from fastgen.trainers.lcd import LCD
from fastgen.workflows.export import export_method
from tiny_models import build_method, make_tiny_sd

PROMPTS = ["a photo of a cat", "a blue car parked in the city at night"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]
TOL = 1e-4

FRESH = r"""
import json, sys, torch
from diffusers import DiffusionPipeline, LCMScheduler
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

full_dir, lora_dir, base_dir, out_dir = sys.argv[1:5]
prompts = json.loads(sys.argv[5])
info = {}

def run(pipe, g):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=4, guidance_scale=g, generator=gen, height=16, width=16,
                output_type="pt").images

pipe = DiffusionPipeline.from_pretrained(full_dir)
pipe.set_progress_bar_config(disable=True)
info["full_class"] = type(pipe).__name__
info["full_scheduler"] = type(pipe.scheduler).__name__
info["time_cond_proj_dim"] = pipe.unet.config.time_cond_proj_dim
info["prediction_type"] = pipe.scheduler.config.prediction_type
full = run(pipe, 3.0)

base = DiffusionPipeline.from_pretrained(base_dir)
base.set_progress_bar_config(disable=True)
base.scheduler = LCMScheduler.from_pretrained(lora_dir)
info["lora_scheduler"] = type(base.scheduler).__name__
before = run(base, 1.0)
base.load_lora_weights(lora_dir)
after = run(base, 1.0)

adapter = base.unet.active_adapters()[0]
loaded = get_peft_model_state_dict(base.unet, adapter_name=adapter)
saved = load_file(lora_dir + "/pytorch_lora_weights.safetensors")
saved = {k[len("unet."):]: v for k, v in saved.items()}
info["saved_keys"] = len(saved)
info["loaded_keys"] = len(loaded)
info["same_keys"] = sorted(saved) == sorted(loaded)
info["same_values"] = info["same_keys"] and all(torch.equal(saved[k], loaded[k].float()) for k in saved)
info["fastgen_imported"] = any(m == "fastgen" or m.startswith("fastgen.") for m in sys.modules)
torch.save({"full": full, "base": before, "lora": after}, out_dir + "/images.pt")
print(json.dumps(info))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-tiny")
    return {"sd": make_tiny_sd(root / "sd"), "sd_v": make_tiny_sd(root / "sd_v", prediction_type="v_prediction")}


def _full_method(teachers) -> LCD:
    """A v-prediction full student whose EMA target differs from the teacher, guidance embedding included."""
    m = build_method(LCD, teacher=str(teachers["sd_v"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.nets.target.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.nets.target.time_embedding.cond_proj.weight.normal_(0.0, 0.05, generator=g)
    return m


def _lora_method(teachers) -> LCD:
    m = build_method(LCD, teacher=str(teachers["sd"]), lora=True, lora_rank=4, lora_alpha=8, lora_target_modules=LORA_TARGETS)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in m.nets.student.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def test_full_and_lora_exports_load_in_stock_diffusers_in_a_fresh_process(teachers, tmp_path):
    full_m, lora_m = _full_method(teachers), _lora_method(teachers)
    full_dir = export_method(full_m, tmp_path / "full", {"metrics": {"digits_fid": 42.5}})
    lora_dir = export_method(lora_m, tmp_path / "lora")

    names = {p.name for p in full_dir.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md"} <= names
    assert list(full_dir.glob("unet/*.safetensors")) and not list(full_dir.rglob("*.bin"))
    assert json.loads((full_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert {p.name for p in lora_dir.iterdir()} >= {"pytorch_lora_weights.safetensors", "README.md", "fastgen_export.json"}

    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(full_dir), str(lora_dir), str(teachers["sd"]), str(tmp_path), json.dumps(PROMPTS)],
        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["fastgen_imported"] is False
    assert info["full_class"] == "StableDiffusionPipeline" and info["full_scheduler"] == "LCMScheduler"
    assert info["time_cond_proj_dim"] == 256 and info["prediction_type"] == "v_prediction"
    assert info["lora_scheduler"] == "LCMScheduler"
    assert info["saved_keys"] == info["loaded_keys"] > 0 and info["same_keys"] and info["same_values"], info

    images = torch.load(tmp_path / "images.pt", weights_only=True)
    ours = full_m.sample(PROMPTS, 4, torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert images["full"].shape == ours.shape == (2, 3, 16, 16)
    assert (images["full"] - ours).abs().max() < TOL
    # not vacuous: the embedded guidance matters, so matching at g=3 pins the g -> w = g - 1 convention
    other = full_m.sample(PROMPTS, 4, torch.Generator().manual_seed(0), guidance_scale=4.0)
    assert (other - ours).abs().max() > 100 * TOL

    ours_lora = lora_m.sample(PROMPTS, 4, torch.Generator().manual_seed(0))
    assert torch.isfinite(images["lora"]).all()
    assert (images["lora"] - ours_lora).abs().max() < TOL
    assert (images["lora"] - images["base"]).abs().max() > 100 * TOL


def test_sdxl_export_reproduces_sample(tmp_path):
    """SDXL: StableDiffusionXLPipeline + LCMScheduler, pooled embeds and time ids as in training (in-process)."""
    from diffusers import DiffusionPipeline

    from tiny_models import make_tiny_sdxl

    m = build_method(LCD, teacher=str(make_tiny_sdxl(tmp_path / "sdxl")), w_min=3.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.nets.target.time_embedding.cond_proj.weight.normal_(0.0, 0.05, generator=g)
    out = export_method(m, tmp_path / "xl-lcm")
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    images = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  height=16, width=16, output_type="pt").images
    ours = m.sample(PROMPTS, 4, torch.Generator().manual_seed(0), guidance_scale=5.0)
    assert (images - ours).abs().max() < TOL


def test_model_card_and_export_json(teachers, tmp_path):
    m = build_method(LCD, teacher=str(teachers["sd"]), sample_guidance_scale=7.0)
    out = export_method(m, tmp_path / "card", {"metrics": {"digits_fid": 12.5, "hps": 0.25}, "steps": 800})
    card = (out / "README.md").read_text()
    for text in (
        "library_name: diffusers",
        "Latent Consistency Distillation",
        str(teachers["sd"]),
        "StableDiffusionPipeline",
        "LCMScheduler (original_inference_steps=50",
        "num_inference_steps=4",
        "guidance_scale=7",
        "guidance_scale = w + 1",
        "EMA target",
        "digits_fid",
        "12.5",
    ):
        assert text in card, text
    info = json.loads((out / "fastgen_export.json").read_text())
    assert info["unet_weights"] == "ema_target" and info["guidance_scale"] == 7.0
    assert info["metrics"] == {"digits_fid": 12.5, "hps": 0.25} and info["metadata"]["steps"] == 800

    lora = build_method(LCD, teacher=str(teachers["sd"]), lora=True, lora_rank=2, lora_target_modules=["to_q"], lora_guidance=6.5)
    out = export_method(lora, tmp_path / "lora-card")
    card = (out / "README.md").read_text()
    assert "guidance_scale=1.0" in card and "load_lora_weights" in card and "w = 6.5" in card
    info = json.loads((out / "fastgen_export.json").read_text())
    assert info["base_model"] == str(teachers["sd"]) and info["guidance_scale"] == 1.0
    assert json.loads((out / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"

    assert "No evaluation" in render_model_card({"title": "x"})


def test_export_into_existing_folder_errors_unless_overwrite(teachers, tmp_path):
    m = build_method(LCD, teacher=str(teachers["sd"]), lora=True, lora_rank=2, lora_target_modules=["to_q"])
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    # a folder of the user's files is never replaced, with or without --overwrite; the file is named
    with pytest.raises(ExportError, match="not made by fastgen.*'keep.txt'"):
        export_method(m, out)
    with pytest.raises(ExportError, match="not made by fastgen.*'keep.txt'"):
        export_method(m, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()
    export_method(m, out)  # an empty folder is used
    with pytest.raises(ExportExistsError, match="overwrite"):
        export_method(m, out)
    export_method(m, out, overwrite=True)  # an earlier export is replaced
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / ".fastgen-folder").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_method(m, tmp_path / "afile")


def test_failed_export_leaves_nothing_behind(teachers, tmp_path, monkeypatch):
    m = build_method(LCD, teacher=str(teachers["sd"]), lora=True, lora_rank=2, lora_target_modules=["to_q"])
    real_write = pipeline_writer._write_plan

    def broken(plan, folder):
        real_write(plan, folder)  # writes the whole folder ...
        raise RuntimeError("disk full")  # ... then fails at the last moment

    monkeypatch.setattr(pipeline_writer, "_write_plan", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_method(m, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    # replacing an existing export: the old one survives a failed overwrite
    monkeypatch.setattr(pipeline_writer, "_write_plan", real_write)
    export_method(m, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(pipeline_writer, "_write_plan", broken)
    with pytest.raises(RuntimeError):
        export_method(m, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_read_run_metrics(tmp_path):
    assert read_run_metrics(tmp_path) == {}
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 100, "digits_fid": 80.0}) + "\n\nnot json\n" + json.dumps({"step": 200, "time": 1.7e9, "digits_fid": 60.0, "tag": "x"}) + "\n"
    )
    assert read_run_metrics(tmp_path) == {"step": 200, "digits_fid": 60.0}
