"""Loading and sampling exported students with stock diffusers (``fastgen sample``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgen.errors import ModelLoadError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "fastgen_export.json"


def export_info(folder: str | Path) -> dict:
    """The ``fastgen_export.json`` of an export folder (recommended guidance, resolution, base model...);
    ``{}`` for a folder without one (e.g. a stock diffusers pipeline)."""
    path = Path(folder) / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def load_exported(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load an exported student: a full pipeline folder, or LoRA weights on their base pipeline.

    Returns ``(pipeline, kind)`` with kind ``"pipeline"`` or ``"lora"``.
    """
    from diffusers import DiffusionPipeline, LCMScheduler

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"export folder '{folder}' does not exist; create one with `fastgen export RUN_DIR OUT_DIR`")
    if (folder / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True), "pipeline"
    if (folder / LORA_WEIGHTS).is_file():
        info = export_info(folder)
        base = info.get("base_model_path") or info.get("base_model")
        if base and not Path(base).is_dir():
            from fastgen.zoo.paths import resolve_model

            base = resolve_model(info.get("base_model", base))
        if not base or not Path(base).is_dir():
            raise ModelLoadError(
                f"LoRA export '{folder}' does not name a base pipeline folder that exists here "
                f"({EXPORT_INFO} base_model_path={info.get('base_model_path')!r}); load the base pipeline yourself and "
                f"call pipe.load_lora_weights('{folder}')"
            )
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=True)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(folder)
        return pipe, "lora"
    raise ModelLoadError(
        f"'{folder}' is neither a diffusers pipeline folder (model_index.json) nor a LoRA export ({LORA_WEIGHTS}); "
        f"pass the OUT_DIR written by `fastgen export`"
    )


def export_call_kwargs(info: dict, num_prompts: int) -> dict:
    """Pipeline-call arguments an export's ``fastgen_export.json`` prescribes beyond steps and guidance:
    the text length of T5-style encoders and true CFG against the empty prompt (CLEAR exports of Flux teachers)."""
    kwargs: dict = {}
    if info.get("max_sequence_length"):
        kwargs["max_sequence_length"] = int(info["max_sequence_length"])
    if float(info.get("true_cfg_scale") or 1.0) > 1.0:
        kwargs["true_cfg_scale"] = float(info["true_cfg_scale"])
        kwargs["negative_prompt"] = [info.get("negative_prompt") or ""] * num_prompts
    return kwargs


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], steps: int = 4, guidance: float | None = None, seed: int = 0,
                num_images: int = 4, out: str | Path = "samples.png", height: int | None = None,
                width: int | None = None, extra: dict | None = None) -> Path:
    """Generate ``num_images`` per prompt (rows = prompts) with a seeded generator and save one PNG grid;
    ``extra``: further pipeline-call arguments (see :func:`export_call_kwargs`)."""
    from fastgen.io import save_image_grid

    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "pt",
              "num_images_per_prompt": num_images, **(extra or {})}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompts, **kwargs).images
    return save_image_grid(images.float().cpu(), out, nrow=num_images, upscale=max(1, 128 // images.shape[-1]))
