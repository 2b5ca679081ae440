"""Load a local diffusers pipeline folder as a teacher, with clear errors.

:func:`load_pipeline` validates the folder *before* anything heavy happens (the folder
exists, it has a ``model_index.json`` naming a supported pipeline class, every component it
lists is present and has weights) and only then calls
``DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)``.
Every problem raises :class:`fastgen.errors.ModelLoadError` whose message names the problem
and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import ModelLoadError

#: Pipeline classes a teacher can be loaded from, mapped to their family.
#: ``LatentConsistencyModelPipeline`` is accepted for SD-family students exported as LCMs.
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "LatentConsistencyModelPipeline": "sd",
}

#: Components never needed by a teacher; when their folder is absent they are passed as
#: ``None`` instead of failing (``safety_checker`` is always dropped).
OPTIONAL_COMPONENTS: tuple[str, ...] = ("safety_checker", "feature_extractor", "image_encoder")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "vocab.txt",
    "tokenizer_config.json",
)


def _supported_list() -> str:
    return ", ".join(SUPPORTED_PIPELINES)


def family_of(class_name: str) -> str:
    """The teacher family (``sd``, ``sdxl``, ``flux``, ``sd3``, ``pixart``) of a pipeline class name.

    Raises:
        ModelLoadError: if the class is not supported; the message lists the supported classes.
    """
    try:
        return SUPPORTED_PIPELINES[class_name]
    except KeyError:
        raise ModelLoadError(
            f"pipeline class {class_name!r} is not supported as a teacher; supported pipeline classes: "
            f"{_supported_list()}. Use a folder saved from one of these pipelines (its model_index.json "
            f"'_class_name' must name it)."
        ) from None


def _component_kind(class_name: str) -> str:
    """Classify a model_index.json entry as ``tokenizer``, ``scheduler``, ``processor`` or ``model``."""
    if "Tokenizer" in class_name:
        return "tokenizer"
    if "Scheduler" in class_name:
        return "scheduler"
    if class_name.endswith(("ImageProcessor", "FeatureExtractor", "Processor")):
        return "processor"
    return "model"


def _expected_weight_file(library: str | None) -> str:
    if library == "transformers":
        return "model.safetensors"
    return "diffusion_pytorch_model.safetensors"


def _what_it_must_contain(kind: str, library: str | None) -> str:
    if kind == "tokenizer":
        return (
            "the tokenizer files (tokenizer.json or vocab.json + merges.txt or spiece.model, "
            "and tokenizer_config.json)"
        )
    if kind == "scheduler":
        return "scheduler_config.json"
    if kind == "processor":
        return "preprocessor_config.json"
    return f"config.json and the weights ({_expected_weight_file(library)} or a .bin file)"


def _has_weights(folder: Path) -> bool:
    for entry in folder.iterdir():
        if entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES):
            return True
    return False


def read_model_index(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a diffusers pipeline folder and return its parsed ``model_index.json``.

    Raises:
        ModelLoadError: the folder does not exist, is not a folder, has no ``model_index.json``,
            or the file is not valid JSON.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(
            f"teacher folder '{path}' does not exist; pass a local diffusers pipeline folder (the one containing "
            f"model_index.json), e.g. the output of pipe.save_pretrained(...)"
        )
    if not folder.is_dir():
        raise ModelLoadError(
            f"teacher path '{path}' is a file, not a folder; pass a local diffusers pipeline folder (the one "
            f"containing model_index.json), e.g. the output of pipe.save_pretrained(...)"
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"teacher folder '{path}' is not a diffusers pipeline folder: it has no model_index.json. Pass the "
            f"top-level folder written by pipe.save_pretrained(...) (it contains model_index.json next to "
            f"unet/ or transformer/, vae/, text_encoder/, ...), not a component subfolder or a single checkpoint file."
        )
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"cannot read '{index_file}': {exc}; fix the JSON or re-save the pipeline with pipe.save_pretrained(...)"
        ) from exc
    if not isinstance(index, dict):
        raise ModelLoadError(
            f"'{index_file}' does not hold a JSON object; re-save the pipeline with pipe.save_pretrained(...)"
        )
    return index


def _listed_components(index: dict[str, Any]) -> dict[str, tuple[str | None, str]]:
    """The components model_index.json lists as present: ``name -> (library, class_name)``."""
    components: dict[str, tuple[str | None, str]] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        library, class_name = value
        if class_name is None:
            continue  # saved as None (e.g. safety_checker=None)
        components[name] = (library, str(class_name))
    return components


def check_pipeline_folder(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Validate a pipeline folder without loading any weights.

    Returns:
        ``(model_index, skipped)``: the parsed ``model_index.json`` and the optional components
        (see :data:`OPTIONAL_COMPONENTS`) to pass as ``None`` because their folder is absent or
        incomplete (``safety_checker`` is always skipped).

    Raises:
        ModelLoadError: with the problem and the fix, for a missing folder, a missing
            ``model_index.json``, an unsupported ``_class_name``, a missing component subfolder
            or a model subfolder without weights.
    """
    folder = Path(path)
    index = read_model_index(folder)
    class_name = index.get("_class_name")
    if not class_name:
        raise ModelLoadError(
            f"model_index.json in '{path}' has no '_class_name'; it must name the pipeline class, one of "
            f"{_supported_list()}. Re-save the pipeline with pipe.save_pretrained(...)"
        )
    family_of(str(class_name))

    skipped: list[str] = []
    for name, (library, comp_class) in _listed_components(index).items():
        kind = _component_kind(comp_class)
        sub = folder / name
        if name == "safety_checker":
            skipped.append(name)
            continue
        optional = name in OPTIONAL_COMPONENTS
        if not sub.is_dir():
            if optional:
                skipped.append(name)
                continue
            raise ModelLoadError(
                f"teacher folder '{path}' is missing the '{name}/' subfolder that model_index.json lists for "
                f"component '{name}' ({comp_class}); '{name}/' must contain {_what_it_must_contain(kind, library)}. "
                f"Copy it from the original model or re-save the whole pipeline with pipe.save_pretrained(...)"
            )
        if kind == "model":
            if not _has_weights(sub):
                if optional:
                    skipped.append(name)
                    continue
                raise ModelLoadError(
                    f"component folder '{sub}' ({comp_class}) has no weights: expected "
                    f"{_expected_weight_file(library)} (or another *.safetensors / *.bin file) next to its "
                    f"config.json. The download or copy is incomplete; copy the weight file into '{name}/' or "
                    f"re-save the pipeline with pipe.save_pretrained(..., safe_serialization=True)"
                )
            if not (sub / "config.json").is_file():
                raise ModelLoadError(
                    f"component folder '{sub}' ({comp_class}) has no config.json; copy it from the original model "
                    f"or re-save the pipeline with pipe.save_pretrained(...)"
                )
        elif kind == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                raise ModelLoadError(
                    f"component folder '{sub}' ({comp_class}) has no scheduler_config.json; copy it from the "
                    f"original model or re-save the pipeline with pipe.save_pretrained(...)"
                )
        elif kind == "tokenizer":
            if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
                raise ModelLoadError(
                    f"component folder '{sub}' ({comp_class}) has no tokenizer files; it must contain "
                    f"{_what_it_must_contain(kind, library)}. Copy them from the original model or re-save the "
                    f"pipeline with pipe.save_pretrained(...)"
                )
    return index, skipped


def _dtype_keyword() -> str:
    """``"dtype"`` on diffusers versions that deprecate ``torch_dtype`` (0.42+), else ``"torch_dtype"``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local diffusers pipeline folder after validating it.

    Calls ``DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)``
    (spelled ``dtype=`` on diffusers versions that deprecate ``torch_dtype``); the safety checker
    (and absent optional components) are passed as ``None``.

    Args:
        path: a folder written by ``pipe.save_pretrained(...)`` (contains ``model_index.json``).
        dtype: the ``torch_dtype`` the components are loaded in.

    Returns:
        The loaded ``DiffusionPipeline`` (on the CPU).

    Raises:
        ModelLoadError: the folder is missing or incomplete, its pipeline class is not one of
            :data:`SUPPORTED_PIPELINES`, or diffusers fails to load it.
    """
    index, skipped = check_pipeline_folder(path)
    kwargs: dict[str, Any] = {name: None for name in skipped}
    if "safety_checker" in index:
        kwargs["safety_checker"] = None
        if "requires_safety_checker" in index:
            kwargs["requires_safety_checker"] = False

    from diffusers import DiffusionPipeline

    kwargs[_dtype_keyword()] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(os.fspath(path), local_files_only=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers/transformers raise many types; report them uniformly
        raise ModelLoadError(
            f"diffusers could not load the pipeline in '{path}' ({type(exc).__name__}: {exc}); check that every "
            f"component folder holds the config and weights written by pipe.save_pretrained(...) with a compatible "
            f"diffusers/transformers version, or re-save the pipeline"
        ) from exc
    loaded = type(pipe).__name__
    if loaded not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"'{path}' loaded as {loaded}, which is not supported as a teacher; supported pipeline classes: "
            f"{_supported_list()}"
        )
    return pipe


__all__ = [
    "OPTIONAL_COMPONENTS",
    "SUPPORTED_PIPELINES",
    "check_pipeline_folder",
    "family_of",
    "load_pipeline",
    "read_model_index",
]
