"""HPSv2 / HPSv2.1 human-preference score.

The scorer is an open_clip ``ViT-H-14`` fine-tuned on human preference pairs.  The score
of an image for a prompt is the cosine similarity of their L2-normalised embeddings
(``logit_scale`` is not applied): raw values are around 0.25-0.35 and the published
benchmark multiplies them by 100.

Preprocessing reproduces the reference evaluation transform
``ToTensor -> Resize(224, bicubic) -> CenterCrop(224) -> Normalize(CLIP mean/std)`` on
batched float tensors, so scores stay differentiable with respect to the images.

Checkpoints (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) are published in the
Hugging Face repo ``xswu/HPSv2``; nothing is downloaded here, the file must be local.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastgen.errors import ConfigError, DataError, ModelLoadError

HPS_VERSIONS: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_STYLES: tuple[str, ...] = ("anime", "concept-art", "paintings", "photo")
HPS_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
HPS_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

HPS_HUB_REPO = "xswu/HPSv2"
_IMAGE_SUFFIXES = (".jpg", ".png")
_ALL_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
_MAX_LISTED = 5


# --------------------------------------------------------------------------- preprocessing


def hps_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = HPS_MEAN,
    std: Sequence[float] = HPS_STD,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> torch.Tensor:
    """Map ``[N,3,H,W]`` images in [0,1] to normalised ``[N,3,size,size]`` CLIP inputs.

    Shortest edge resized to ``size`` (bicubic, antialiased, long edge truncated to an
    int, aspect kept), centre crop exactly as torchvision's ``CenterCrop``, then
    ``(x - mean) / std``.  Every step is a differentiable tensor op.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"expected images of shape [N,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise DataError(f"expected float images in [0,1], got dtype {images.dtype}")
    x = TF.resize(images, [size], interpolation=interpolation, antialias=True)
    x = TF.center_crop(x, [size, size])
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _pil_to_tensor(image: Any) -> torch.Tensor:
    """PIL image -> float ``[3,H,W]`` in [0,1] (RGB), like ``ToTensor`` after ``convert('RGB')``."""
    rgb = image.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255)


def hps_preprocess_pil(image: Any) -> torch.Tensor:
    """Preprocess one PIL image (any mode; converted to RGB) into a ``[3,224,224]`` tensor."""
    return hps_preprocess(_pil_to_tensor(image)[None])[0]


# --------------------------------------------------------------------------- open_clip loading


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``{'state_dict': ...}`` or bare)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a checkpoint
        raise ModelLoadError(f"could not read checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"checkpoint {path} holds no state dict (expected a dict of tensors or {{'state_dict': ...}})"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _first(items: Sequence[str]) -> str:
    """The first few items, comma separated, with an ellipsis when there are more."""
    return ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")


def _listing(keys: Sequence[str]) -> str:
    return f"{len(keys)} ({_first(sorted(keys))})"


def load_open_clip_model(
    model_name: str,
    checkpoint: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build ``model_name`` with open_clip (no pretrained tag) and load ``checkpoint`` with strict keys."""
    import open_clip

    path = Path(checkpoint)
    if not path.is_file():
        raise ModelLoadError(f"open_clip checkpoint {path} does not exist")
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    except RuntimeError as exc:
        raise ConfigError(f"unknown open_clip model config {model_name!r}: {exc}") from exc
    state = _read_state_dict(path)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {path} does not match the model config {model_name!r}: "
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"checkpoint {path} does not match the model config {model_name!r}: {exc}") from exc
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- checkpoints


def _check_version(version: str) -> str:
    if version not in HPS_VERSIONS:
        raise ConfigError(f"unknown HPS version {version!r}; valid versions: {', '.join(HPS_VERSIONS)}")
    return HPS_VERSIONS[version]


def _missing_checkpoint(version: str, fname: str, looked_at: Path) -> ModelLoadError:
    return ModelLoadError(
        f"HPS {version} checkpoint {fname} not found (looked at {looked_at}). It is published at "
        f"https://huggingface.co/{HPS_HUB_REPO}/blob/main/{fname}; download it and pass its path "
        f"(or the folder holding it), or put it in $HPS_ROOT (default ~/.cache/hpsv2)."
    )


def find_hps_checkpoint(version: str = "v2.1", path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the HPS checkpoint for ``version``.

    ``path`` may be the checkpoint file itself or a folder holding it; without it the file
    is looked up in ``$HPS_ROOT`` (default ``~/.cache/hpsv2``) and then in the local
    Hugging Face cache.  A ``.safetensors`` file with the same stem is accepted too.
    """
    fname = _check_version(version)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            for other, other_name in HPS_VERSIONS.items():
                if other != version and p.name == other_name:
                    raise ConfigError(f"{p.name} is the HPS {other} checkpoint but version={version!r} was requested")
            return p
        if not p.is_dir():
            raise _missing_checkpoint(version, fname, p)
        folder = p
    else:
        folder = Path(os.environ.get("HPS_ROOT", "~/.cache/hpsv2")).expanduser()
    for candidate in (folder / fname, folder / (Path(fname).stem + ".safetensors")):
        if candidate.is_file():
            return candidate
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(HPS_HUB_REPO, fname)
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached)
        except Exception:  # no cache / incompatible hub version: fall through to the error
            pass
    raise _missing_checkpoint(version, fname, folder / fname)


# --------------------------------------------------------------------------- scorer


class HPSScorer(torch.nn.Module):
    """HPS scorer: cosine similarity of normalised open_clip image and text embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, version: str, model_name: str, checkpoint: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self.model_name = model_name
        self.checkpoint = checkpoint
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str] | None = None,
        version: str = "v2.1",
        model_name: str = "ViT-H-14",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HPSScorer:
        """Build the open_clip model and load the local HPS checkpoint (see :func:`find_hps_checkpoint`)."""
        import open_clip

        ckpt = find_hps_checkpoint(version, path)
        model = load_open_clip_model(model_name, ckpt, device=device, dtype=dtype)
        return cls(model, open_clip.get_tokenizer(model_name), version, model_name, ckpt.name)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings ``[len(prompts), D]``; each distinct prompt is encoded once."""
        device = self._device
        if not prompts:
            raise DataError("encode_text needs at least one prompt")
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            tokens = self.tokenizer(todo).to(device)
            feats = self.model.encode_text(tokens, normalize=True)
            for prompt, feat in zip(todo, feats):
                self._text_cache[prompt] = feat
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw cosine per image for already-preprocessed ``[N,3,224,224]`` inputs."""
        if len(prompts) != pixels.shape[0]:
            raise DataError(f"{pixels.shape[0]} images but {len(prompts)} prompts: HPS pairs image i with prompt i")
        img = self.model.encode_image(pixels.to(device=self._device, dtype=self._dtype), normalize=True)
        txt = self.encode_text(list(prompts)).to(img.dtype)
        return (img * txt).sum(dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw cosine ``[N]`` for images ``[N,3,H,W]`` in [0,1]; differentiable w.r.t. ``images``."""
        if images.ndim != 4 or len(prompts) != images.shape[0]:
            raise DataError(
                f"expected images [N,3,H,W] with one prompt each, got shape {tuple(images.shape)} "
                f"and {len(prompts)} prompts"
            )
        return self.score_pixels(hps_preprocess(images.to(self._device)), prompts)

    def describe(self) -> dict[str, str]:
        return {
            "metric": "hps",
            "version": self.version,
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "convention": "cosine x100 (benchmark)",
            "preprocessing": "resize shortest edge to 224 (bicubic, antialias) + center crop 224 + CLIP mean/std",
        }


# --------------------------------------------------------------------------- benchmark


def load_benchmark_prompts(
    prompts_dir: str | os.PathLike[str],
    styles: Sequence[str] = HPS_STYLES,
    per_style: int | None = 800,
) -> dict[str, list[str]]:
    """Read ``<prompts_dir>/<style>.json`` (a JSON list of strings) for each style."""
    out: dict[str, list[str]] = {}
    for style in styles:
        path = Path(prompts_dir) / f"{style}.json"
        if not path.is_file():
            raise DataError(f"HPS benchmark prompts file {path} not found (one JSON list of prompts per style)")
        try:
            prompts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"could not read HPS benchmark prompts {path}: {exc}") from exc
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"{path} must hold a JSON list of strings")
        if per_style is not None and len(prompts) != per_style:
            raise DataError(f"{path} has {len(prompts)} prompts for style {style!r}, expected {per_style}")
        out[style] = prompts
    return out


def _style_image_paths(folder: Path, n: int) -> list[Path]:
    """Paths ``<folder>/<idx:05d>.jpg|.png`` for idx < n; any missing, duplicated or extra image is an error."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found ({n} prompts need {n} images named 00000.jpg ...)")
    present = {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _ALL_IMAGE_SUFFIXES}
    paths: list[Path] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    expected: set[str] = set()
    for i in range(n):
        names = [f"{i:05d}{suffix}" for suffix in _IMAGE_SUFFIXES]
        expected.update(names)
        found = [name for name in names if name in present]
        if not found:
            missing.append(str(folder / names[0]))
        elif len(found) > 1:
            ambiguous.append(" and ".join(found))
        else:
            paths.append(folder / found[0])
    extra = sorted(present - expected)
    if missing or extra or ambiguous:
        parts = [f"{n} prompts but {len(present)} images in {folder}"]
        if missing:
            parts.append(f"{len(missing)} missing: {_first(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected: {_first(extra)}")
        if ambiguous:
            parts.append(f"both .jpg and .png for: {_first(ambiguous)}")
        raise DataError("; ".join(parts) + " (image i must be <idx:05d>.jpg or .png for prompt i)")
    return paths


def _load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return hps_preprocess_pil(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"could not read image {path}: {exc}") from exc


@torch.no_grad()
def hps_benchmark(
    scorer: HPSScorer,
    images_root: str | os.PathLike[str],
    prompts_dir: str | os.PathLike[str],
    styles: Sequence[str] = HPS_STYLES,
    per_style: int = 800,
    batch_size: int = 20,
) -> dict[str, Any]:
    """Score ``<images_root>/<style>/<idx:05d>.jpg`` against prompt ``idx`` of each style.

    Per style: mean score x100 and the std (x100, ddof=0) of the means of 10 consecutive
    chunks of ``n/10`` images; ``average`` is the mean over all images x100.
    """
    prompts = load_benchmark_prompts(prompts_dir, styles, per_style)
    layout = {style: _style_image_paths(Path(images_root) / style, len(prompts[style])) for style in styles}
    results: dict[str, dict[str, float | int]] = {}
    everything: list[float] = []
    for style in styles:
        paths, texts = layout[style], prompts[style]
        scores: list[float] = []
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack([_load_image(p) for p in paths[start : start + batch_size]])
            scores.extend(scorer.score_pixels(pixels, texts[start : start + batch_size]).float().cpu().tolist())
        arr = np.asarray(scores, dtype=np.float64) * 100
        chunk = max(1, len(arr) // 10)
        chunk_means = [arr[i : i + chunk].mean() for i in range(0, len(arr), chunk)]
        results[style] = {"mean": float(arr.mean()), "chunk_std": float(np.std(chunk_means)), "n": len(arr)}
        everything.extend(arr.tolist())
    return {
        "metric": "hps",
        "version": scorer.version,
        "model": scorer.model_name,
        "checkpoint": scorer.checkpoint,
        "styles": results,
        "average": float(np.mean(everything)),
        "n": len(everything),
        "convention": "x100",
    }
