"""Measures the shipped digits-world models: ``fastgen zoo check``.

Samples each teacher through its *stock* diffusers pipeline (so the numbers are what a user of
the folder gets), scores the images with the digits classifier, and writes
``digits_teachers.json`` / ``.md`` plus one sample grid per teacher (one image per (colour, digit) pair,
taken from the scored samples when they cover every pair, sampled otherwise). Progress bars (images
done / total, images/s) go to stderr; ``progress=False`` or ``TQDM_DISABLE=1`` turns them off.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
                        seed: int = 0, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """Images in [0,1] from the stock StableDiffusionPipeline, one seeded generator per batch
    (:func:`fastgen.evaluation.bench.sample_pipeline`, so they equal a quality suite's samples of it)."""
    return sample_pipeline(pipe, prompts, steps, guidance, seed, batch_size, height=zb.UNET_RESOLUTION,
                           progress=progress, desc=f"UNet teacher@{steps}")


def sample_dit_teacher(pipe, prompts: list[str], steps: int = 50, guidance: float = zb.DIT_GUIDANCE,
                       seed: int = 0, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """Images in [0,1] from the stock FluxPipeline (true CFG against the empty prompt)."""
    return sample_pipeline(pipe, prompts, steps, 1.0, seed, batch_size, height=zb.DIT_RESOLUTION,
                           negative_prompt="" if guidance > 1 else None, true_cfg_scale=guidance,
                           max_sequence_length=zb.DIT_MAX_SEQUENCE_LENGTH, progress=progress, desc=f"DiT teacher@{steps}")


def _run_checks(checks: list[tuple[str, Callable[[], Any]]], progress: bool) -> list[Any]:
    """Each ``(name, fn)``'s ``fn()`` in turn, under a tqdm bar on stderr naming the check that runs."""
    from tqdm.auto import tqdm

    off = {} if progress else {"disable": True}  # unset when enabled, so that TQDM_DISABLE=1 applies
    out = []
    with tqdm(total=len(checks), desc=f"checks: {checks[0][0]}", unit="check", file=sys.stderr, dynamic_ncols=True,
              **off) as bar:
        for name, fn in checks:
            bar.set_description(f"checks: {name}")
            out.append(fn())
            bar.update(1)
    return out


def grid_prompts() -> tuple[list[str], int]:
    """One prompt per (colour, digit): rows are colours, columns digits."""
    return [dw.caption(d, c) for c in range(len(dw.PALETTE)) for d in range(10)], 10


def grid_from_samples(images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor | None:
    """The first sample of every (colour, digit) pair in :func:`grid_prompts` order (rows colours, columns
    digits); ``None`` when some pair has no sample."""
    picks = []
    for c in range(len(dw.PALETTE)):
        for d in range(10):
            hits = ((digits == d) & (colours == c)).nonzero()
            if not len(hits):
                return None
            picks.append(int(hits[0]))
    return images[picks]


#: a teacher row is a candidate only if it draws the prompted digit this often
MIN_DIGIT_ACCURACY = 0.97


def _better(row: dict, best: dict) -> bool:
    """The lower digits-FID among scales that draw the prompted digit (accuracy >= MIN_DIGIT_ACCURACY);
    a scale that does beats one that does not."""
    ok, best_ok = row["digit_accuracy"] >= MIN_DIGIT_ACCURACY, best["digit_accuracy"] >= MIN_DIGIT_ACCURACY
    if ok != best_ok:
        return ok
    return row["digits_fid"] < best["digits_fid"]


def check(samples: int = 1000, steps: int = 50, out_dir: str | Path = "benchmarks/results", root=None,
          name: str = "digits_teachers", seed: int = 0, progress: bool = True, keep_images: bool = False,
          note: str = "", dit_guidance: list[float] | None = None) -> dict:
    """Score both teachers, the VAEs and the classifier; write JSON, markdown and grids.

    ``progress``: bars on stderr while sampling. ``keep_images``: the result also holds
    ``"_images": {"unet_teacher": ..., "dit_teacher": ...}`` ([N,3,H,W] in [0,1], the scored samples, on
    the prompts of ``fastgen.data.digits.eval_prompts(samples, seed)``) and ``"_seconds"`` (not written to
    the JSON), for reuse (``fastgen demo``). ``note``: a paragraph added to the markdown. ``dit_guidance``: the
    DiT teacher's true-CFG scales to measure (default: the shipped world's); with several, each is scored under
    the same protocol, all are listed (``dit_guidance_sweep``) and the teacher's row is the lowest digits-FID
    among the scales whose digit accuracy is at least :data:`MIN_DIGIT_ACCURACY`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    classifier = paths.load_classifier(root)
    evaluator = DigitsEvaluator(classifier)
    prompts, digits, colours = dw.eval_prompts(samples, seed=seed)
    rows: dict = {}
    (floor,) = _run_checks([("real-vs-real digits-FID floor", lambda: round(evaluator.real_floor(), 3))], progress)
    protocol = {
        "prompts": "canonical 'a {colour} handwritten digit {digit}', balanced over 60 pairs",
        "seed": seed,
        "fid_features": "digits classifier penultimate (64-d), images quantised to 8 bits",
        "fid_reference": "held-out split, every colour (2154 images)",
        "real_vs_real_fid_floor": floor,
        "torch": torch.__version__,
        "device": "cpu",
        "machine": platform.machine(),
    }

    kept, kept_seconds = {}, {}
    gp, nrow = grid_prompts()

    sd = load_sd_pipeline(root)
    sd.set_progress_bar_config(disable=True)
    t0 = time.time()
    images = sample_unet_teacher(sd, prompts, steps=steps, seed=seed, progress=progress)
    seconds = time.time() - t0
    rows["unet_teacher"] = {"pipeline": "StableDiffusionPipeline (DDIM)", "steps": steps, "guidance": zb.UNET_GUIDANCE,
                            **evaluator.score(images, digits, colours).as_dict(), "seconds": round(seconds, 1)}
    grid = grid_from_samples(images, digits, colours)
    if grid is None:
        grid = sample_unet_teacher(sd, gp, steps=steps, seed=seed, progress=progress)
    save_image_grid(grid, out_dir / f"{name}_unet_grid.png", nrow, upscale=2)
    if keep_images:
        kept["unet_teacher"], kept_seconds["unet_teacher"] = images, seconds

    flux = load_flux_pipeline(root)
    flux.set_progress_bar_config(disable=True)
    sweep, best = [], None
    for g in dit_guidance or [zb.DIT_GUIDANCE]:
        t0 = time.time()
        scored = sample_dit_teacher(flux, prompts, steps=steps, guidance=float(g), seed=seed, progress=progress)
        row = {"pipeline": "FluxPipeline (flow-matching Euler)", "steps": steps, "guidance": float(g),
               "max_sequence_length": zb.DIT_MAX_SEQUENCE_LENGTH,
               **evaluator.score(scored, digits, colours).as_dict(), "seconds": round(time.time() - t0, 1)}
        sweep.append(row)
        if best is None or _better(row, best[0]):
            best = (row, scored)
    (rows["dit_teacher"], images), seconds = best, best[0]["seconds"]
    if len(sweep) > 1:
        rows["dit_guidance_sweep"] = sweep
    grid = grid_from_samples(images, digits, colours)
    if grid is None:
        grid = sample_dit_teacher(flux, gp, steps=steps, guidance=rows["dit_teacher"]["guidance"], seed=seed, progress=progress)
    save_image_grid(grid, out_dir / f"{name}_dit_grid.png", nrow, upscale=2 if zb.DIT_RESOLUTION <= 32 else 1)
    if keep_images:
        kept["dit_teacher"], kept_seconds["dit_teacher"] = images, seconds
    del images

    psnr, psnr_f2, accuracy = _run_checks([
        ("UNet VAE PSNR", lambda: round(zb.vae_psnr(sd.vae, zb.UNET_RESOLUTION), 2)),
        ("DiT VAE PSNR", lambda: round(zb.vae_psnr(flux.vae, zb.DIT_RESOLUTION, limit=512), 2)),
        ("classifier accuracy", lambda: zb.classifier_accuracy(classifier, "test")),
    ], progress)
    rows["vae"] = {"psnr": psnr, "resolution": zb.UNET_RESOLUTION, "factor": 4, "split": "test"}
    rows["vae_f2"] = {"psnr": psnr_f2, "resolution": zb.DIT_RESOLUTION, "factor": 2, "split": "test"}
    rows["classifier"] = {**accuracy, "trained_on": "train split only"}
    result = {**rows, "protocol": protocol}
    atomic_write_json(out_dir / f"{name}.json", result)
    table = [{"model": k, **v} for k, v in rows.items() if k.endswith("teacher")]
    table += [{"model": "dit_teacher (sweep)", **r} for r in rows.get("dit_guidance_sweep", [])]
    md = [
        "# Digits-world teachers\n",
        f"Measured by `fastgen zoo check` ({samples} samples per teacher, seed {seed}). "
        f"Real-vs-real digits-FID floor (train split vs held-out): {protocol['real_vs_real_fid_floor']}.\n\n",
        *([note.strip() + "\n\n"] if note.strip() else []),
        markdown_table(table, ["model", "pipeline", "steps", "guidance", "digit_accuracy", "colour_accuracy",
                               "digits_fid", "samples", "seconds"]),
        "\n",
        markdown_table([{"model": k, **rows[k]} for k in ("vae", "vae_f2")], ["model", "psnr", "resolution", "factor", "split"]),
        "\n",
        markdown_table([{"model": "classifier", **rows["classifier"]}], ["model", "digit_accuracy", "colour_accuracy", "samples", "trained_on"]),
    ]
    atomic_write_text(out_dir / f"{name}.md", "".join(md))
    if keep_images:
        return {**result, "_images": kept, "_seconds": kept_seconds}
    return result
