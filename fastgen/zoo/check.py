"""Measures the shipped digits-world models: ``fastgen zoo check``.

Samples each teacher through its *stock* diffusers pipeline (so the numbers are what a user of
the folder gets), scores the images with the digits classifier, and writes
``digits_teachers.json`` / ``.md`` plus one sample grid per teacher.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from fastgen.data import digits as dw
from fastgen.evaluation.bench import sample_pipeline
from fastgen.evaluation.digits_metrics import DigitsEvaluator
from fastgen.evaluation.reports import markdown_table
from fastgen.io import atomic_write_json, atomic_write_text, save_image_grid
from fastgen.zoo import build as zb
from fastgen.zoo import paths


def shipped_models(root=None) -> list[tuple[str, Path]]:
    """``(label, path)`` of the shipped digits-world teachers and classifier (``fastgen zoo where``)."""
    return [("UNet teacher (StableDiffusionPipeline)", paths.sd_teacher(root)),
            ("DiT teacher (FluxPipeline)", paths.flux_teacher(root)),
            ("digits classifier", paths.classifier(root))]


def load_sd_pipeline(root=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(paths.sd_teacher(root), local_files_only=True)


def load_flux_pipeline(root=None):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(paths.flux_teacher(root), local_files_only=True)


def sample_unet_teacher(pipe, prompts: list[str], steps: int = 50, guidance: float = zb.UNET_GUIDANCE,
                        seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """Images in [0,1] from the stock StableDiffusionPipeline, one seeded generator per batch."""
    return sample_pipeline(pipe, prompts, steps, guidance, seed, batch_size, height=zb.UNET_RESOLUTION)


def sample_dit_teacher(pipe, prompts: list[str], steps: int = 50, guidance: float = zb.DIT_GUIDANCE,
                       seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """Images in [0,1] from the stock FluxPipeline (true CFG against the empty prompt)."""
    return sample_pipeline(pipe, prompts, steps, 1.0, seed, batch_size, height=zb.DIT_RESOLUTION,
                           negative_prompt="" if guidance > 1 else None, true_cfg_scale=guidance,
                           max_sequence_length=zb.DIT_MAX_SEQUENCE_LENGTH)


def grid_prompts() -> tuple[list[str], int]:
    """One prompt per (colour, digit): rows are colours, columns digits."""
    return [dw.caption(d, c) for c in range(len(dw.PALETTE)) for d in range(10)], 10


def check(samples: int = 1000, steps: int = 50, out_dir: str | Path = "benchmarks/results", root=None,
          name: str = "digits_teachers", seed: int = 0) -> dict:
    """Score both teachers, the VAEs and the classifier; write JSON, markdown and grids."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    classifier = paths.load_classifier(root)
    evaluator = DigitsEvaluator(classifier)
    prompts, digits, colours = dw.eval_prompts(samples, seed=seed)
    rows: dict = {}
    protocol = {
        "prompts": "canonical 'a {colour} handwritten digit {digit}', balanced over 60 pairs",
        "seed": seed,
        "fid_features": "digits classifier penultimate (64-d), images quantised to 8 bits",
        "fid_reference": "held-out split, every colour (2154 images)",
        "real_vs_real_fid_floor": round(evaluator.real_floor(), 3),
        "torch": torch.__version__,
        "device": "cpu",
        "machine": platform.machine(),
    }

    sd = load_sd_pipeline(root)
    sd.set_progress_bar_config(disable=True)
    t0 = time.time()
    images = sample_unet_teacher(sd, prompts, steps=steps, seed=seed)
    seconds = time.time() - t0
    rows["unet_teacher"] = {"pipeline": "StableDiffusionPipeline (DDIM)", "steps": steps, "guidance": zb.UNET_GUIDANCE,
                            **evaluator.score(images, digits, colours).as_dict(), "seconds": round(seconds, 1)}
    gp, nrow = grid_prompts()
    save_image_grid(sample_unet_teacher(sd, gp, steps=steps, seed=seed), out_dir / f"{name}_unet_grid.png", nrow, upscale=2)

    flux = load_flux_pipeline(root)
    flux.set_progress_bar_config(disable=True)
    t0 = time.time()
    images = sample_dit_teacher(flux, prompts, steps=steps, seed=seed)
    seconds = time.time() - t0
    rows["dit_teacher"] = {"pipeline": "FluxPipeline (flow-matching Euler)", "steps": steps, "guidance": zb.DIT_GUIDANCE,
                           **evaluator.score(images, digits, colours).as_dict(), "seconds": round(seconds, 1)}
    save_image_grid(sample_dit_teacher(flux, gp, steps=steps, seed=seed), out_dir / f"{name}_dit_grid.png", nrow)

    rows["vae"] = {"psnr": round(zb.vae_psnr(sd.vae, zb.UNET_RESOLUTION), 2), "resolution": zb.UNET_RESOLUTION,
                   "factor": 4, "split": "test"}
    rows["vae_f2"] = {"psnr": round(zb.vae_psnr(flux.vae, zb.DIT_RESOLUTION, limit=512), 2),
                      "resolution": zb.DIT_RESOLUTION, "factor": 2, "split": "test"}
    rows["classifier"] = {**zb.classifier_accuracy(classifier, "test"), "trained_on": "train split only"}
    result = {**rows, "protocol": protocol}
    atomic_write_json(out_dir / f"{name}.json", result)
    table = [{"model": k, **v} for k, v in rows.items() if k.endswith("teacher")]
    md = [
        "# Digits-world teachers\n",
        f"Measured by `fastgen zoo check` ({samples} samples per teacher, seed {seed}). "
        f"Real-vs-real digits-FID floor (train split vs held-out): {protocol['real_vs_real_fid_floor']}.\n\n",
        markdown_table(table, ["model", "pipeline", "steps", "guidance", "digit_accuracy", "colour_accuracy",
                               "digits_fid", "samples", "seconds"]),
        "\n",
        markdown_table([{"model": k, **rows[k]} for k in ("vae", "vae_f2")], ["model", "psnr", "resolution", "factor", "split"]),
        "\n",
        markdown_table([{"model": "classifier", **rows["classifier"]}], ["model", "digit_accuracy", "colour_accuracy", "samples", "trained_on"]),
    ]
    atomic_write_text(out_dir / f"{name}.md", "".join(md))
    return result
