"""Loading and sampling exported students with stock diffusers (``fastgen sample``), and the progress
bar of every long sampling loop (:class:`ImageProgress`)."""

from __future__ import annotations

import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen.errors import ConfigError, ModelLoadError, ResolutionError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "fastgen_export.json"
SCHEDULER_CONFIG = "scheduler_config.json"

#: Pipeline classes whose ``check_inputs`` wants image sizes divisible by 8, whatever the VAE factor.
_MULTIPLE_OF_8_PIPELINES = frozenset({
    "StableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline",
    "PixArtAlphaPipeline", "PixArtSigmaPipeline",
})


def _read_json(path: Path) -> dict:
    """A JSON file as a dict; ``{}`` when the file is absent; a clear error when it does not parse."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{path}' is not readable JSON ({exc}); fix the file or export the folder again") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"'{path}' holds a {type(data).__name__}, not a JSON object; fix the file or export the folder again")
    return data


def export_info(folder: str | Path) -> dict:
    """The ``fastgen_export.json`` of an export folder (recommended guidance, resolution, base model...);
    ``{}`` for a folder without one (e.g. a stock diffusers pipeline)."""
    return _read_json(Path(folder) / EXPORT_INFO)


def _lora_base(folder: Path, info: dict) -> Path:
    """The base pipeline folder a LoRA export names in its ``fastgen_export.json``."""
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
    return Path(base)


def _lora_scheduler_config(folder: Path, base: Path) -> dict:
    """The LCMScheduler config a LoRA export samples with: the one it was exported with
    (``scheduler_config.json`` beside the weights), else its base pipeline's."""
    own = _read_json(folder / SCHEDULER_CONFIG)
    return own or _read_json(base / "scheduler" / SCHEDULER_CONFIG)


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
        base = _lora_base(folder, export_info(folder))
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=True)
        pipe.scheduler = LCMScheduler.from_config(_lora_scheduler_config(folder, base) or pipe.scheduler.config)
        pipe.load_lora_weights(folder)
        return pipe, "lora"
    raise ModelLoadError(
        f"'{folder}' is neither a diffusers pipeline folder (model_index.json) nor a LoRA export ({LORA_WEIGHTS}); "
        f"pass the OUT_DIR written by `fastgen export`"
    )


@dataclass(frozen=True)
class SamplingLimits:
    """What an export (or pipeline) folder can sample, read from its config files before any weights load.

    Attributes:
        max_steps: the most sampling steps its scheduler accepts (``None``: no limit known).
        steps_why: where ``max_steps`` comes from (for messages).
        size_multiple: image heights and widths must be multiples of this (``None``: unknown).
        size_why: where ``size_multiple`` comes from (for messages).
    """

    max_steps: int | None = None
    steps_why: str = ""
    size_multiple: int | None = None
    size_why: str = ""


def sampling_limits(folder: str | Path) -> SamplingLimits:
    """The step range and image-size multiple of an export folder (a pipeline folder or a LoRA export
    on its base pipeline), from ``scheduler_config.json``, ``vae/config.json`` and ``model_index.json``.
    A folder that is neither gives empty limits (:func:`load_exported` reports it)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        pipe_dir = folder
        sched_path = folder / "scheduler" / SCHEDULER_CONFIG
        sched = _read_json(sched_path)
        sched_class = sched.get("_class_name", "")
    elif (folder / LORA_WEIGHTS).is_file():
        pipe_dir = _lora_base(folder, export_info(folder))
        sched_path = folder / SCHEDULER_CONFIG
        if not sched_path.is_file():
            sched_path = pipe_dir / "scheduler" / SCHEDULER_CONFIG
        sched = _lora_scheduler_config(folder, pipe_dir)
        sched_class = "LCMScheduler"  # load_exported samples LoRA exports with it
    else:
        return SamplingLimits()

    max_steps, steps_why = None, ""
    train_steps = int(sched.get("num_train_timesteps") or 1000)
    if sched_class == "LCMScheduler":
        original = int(sched.get("original_inference_steps") or 50)
        max_steps = min(original, train_steps)
        steps_why = (f"its LCMScheduler samples a subset of the {original}-step grid it was distilled on: "
                     f"original_inference_steps={original} in {sched_path}")
    elif sched_class and not sched_class.startswith("FlowMatch"):
        max_steps = train_steps
        steps_why = f"its {sched_class} has num_train_timesteps={train_steps} in {sched_path}"
    if "readout_timestep" in export_info(folder):
        max_steps = 1
        steps_why = (f"it is a one-step generator: its network maps the starting noise to the sample (readout_timestep in "
                     f"{folder / 'fastgen_export.json'})")

    vae = _read_json(pipe_dir / "vae" / "config.json")
    multiple, size_why = None, ""
    if vae.get("block_out_channels"):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        pipe_class = _read_json(pipe_dir / "model_index.json").get("_class_name", "")
        multiple, size_why = factor, f"the VAE factor {factor} of {pipe_dir / 'vae' / 'config.json'}"
        if pipe_class.startswith("Flux"):
            multiple, size_why = factor * 2, size_why + " x 2 for Flux's 2x2 latent packing"
        else:
            patch = int(_read_json(pipe_dir / "transformer" / "config.json").get("patch_size") or 1)
            if patch > 1:
                multiple, size_why = factor * patch, size_why + f" x the transformer patch size {patch}"
        if pipe_class in _MULTIPLE_OF_8_PIPELINES and multiple % 8:
            multiple = math.lcm(multiple, 8)
            size_why += f"; {pipe_class} checks for multiples of 8"
    return SamplingLimits(max_steps, steps_why, multiple, size_why)


def check_sampling_args(folder: str | Path, steps: int, height: int | None = None, width: int | None = None,
                        num_images: int = 1) -> SamplingLimits:
    """Refuse sampling arguments the export cannot take, before any weights load.

    Checks that ``steps`` and ``num_images`` are at least 1, that ``steps`` is within the range of
    the folder's scheduler (an LCMScheduler samples at most ``original_inference_steps`` steps) and that
    ``height`` / ``width`` are positive multiples of the VAE factor (x 2 for Flux, x the patch size of
    a DiT). Returns the folder's :class:`SamplingLimits`.

    Raises:
        ConfigError: ``steps`` or ``num_images`` out of range (the message gives the allowed range).
        ResolutionError: a size is not a positive multiple of the model's (the nearest valid sizes).
    """
    if num_images < 1:
        raise ConfigError(f"--num-images (images per prompt) must be at least 1, got {num_images}; e.g. --num-images 4")
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}; consistency students sample in 1 to 8 steps, e.g. --steps 4")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value < 1:
            raise ResolutionError(f"--{name} must be a positive number of pixels, got {value}")
    limits = sampling_limits(folder)
    if limits.max_steps is not None and steps > limits.max_steps:
        raise ConfigError(f"--steps {steps} is out of range for '{folder}': it samples with 1 to {limits.max_steps} steps "
                          f"({limits.steps_why}); pass --steps {limits.max_steps} or fewer")
    m = limits.size_multiple
    if m:
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % m:
                lower, upper = (value // m) * m, (value // m + 1) * m
                nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                raise ResolutionError(f"--{name} {value} does not fit '{folder}': image sizes must be multiples of {m} "
                                      f"({limits.size_why}); nearest valid: {nearest}")
    return limits


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


class ImageProgress:
    """A tqdm bar on stderr counting images (done / total, images/s) over a sampling or scoring loop.

    ``enabled=False`` (or ``TQDM_DISABLE=1`` in the environment, tqdm's own switch) shows nothing.
    Within one pipeline call the bar moves with the denoising steps: :meth:`call_kwargs` gives a
    diffusers ``callback_on_step_end`` that advances it by ``images * (step + 1) / steps``; :meth:`done`
    then sets the exact count once the call returns. ``delay``: seconds before the bar first shows
    (a loop that ends sooner prints nothing).

    >>> with ImageProgress(500, "teacher@50") as bar:
    ...     for chunk in chunks:
    ...         images = pipe(chunk, **bar.call_kwargs(pipe, len(chunk), steps)).images
    ...         bar.done(len(chunk))
    """

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, total: int, desc: str, enabled: bool = True, delay: float = 0.0) -> None:
        from tqdm.auto import tqdm

        off = {} if enabled else {"disable": True}  # left unset when enabled, so that TQDM_DISABLE=1 applies
        self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                        delay=delay, bar_format=self.BAR_FORMAT, **off)
        self.count = 0

    def _to(self, value: float) -> None:
        self.bar.update(value - self.bar.n)

    def done(self, images: int) -> None:
        """``images`` more images are finished."""
        self.count += images
        self._to(self.count)

    def finish(self) -> None:
        """Every image of the bar's total is finished."""
        self.count = self.bar.total
        self._to(self.count)

    def call_kwargs(self, pipe, images: int, steps: int) -> dict:
        """``{"callback_on_step_end": ...}`` advancing the bar within a call of ``pipe`` on ``images`` images
        with ``steps`` denoising steps; ``{}`` when the bar is off or the pipeline takes no such callback."""
        if self.bar.disable or steps < 1:
            return {}
        try:
            params = inspect.signature(pipe.__call__).parameters
        except (TypeError, ValueError):
            return {}
        if "callback_on_step_end" not in params:
            return {}
        base = self.count

        def on_step_end(_pipe, step_index, _timestep, callback_kwargs):
            self._to(base + images * min(step_index + 1, steps) / steps)
            return callback_kwargs

        return {"callback_on_step_end": on_step_end}

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ImageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], steps: int = 4, guidance: float | None = None, seed: int = 0,
                num_images: int = 4, out: str | Path = "samples.png", height: int | None = None,
                width: int | None = None, extra: dict | None = None, progress: bool = True) -> Path:
    """Generate ``num_images`` per prompt (rows = prompts) with a seeded generator and save one PNG grid;
    ``extra``: further pipeline-call arguments (see :func:`export_call_kwargs`); ``progress``: an
    :class:`ImageProgress` bar on stderr (shown when the call takes over a second)."""
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
    total = len(prompts) * num_images
    with ImageProgress(total, "grid", enabled=progress, delay=1.0) as bar:
        images = pipe(prompts, **{**bar.call_kwargs(pipe, total, steps), **kwargs}).images
        bar.done(total)
    return save_image_grid(images.float().cpu(), out, nrow=num_images, upscale=max(1, 128 // images.shape[-1]))
