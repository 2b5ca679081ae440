"""CLIP score: ``max(100 * cos(E_image, E_text), 0)`` per image, mean reported (torchmetrics convention).

Two backends:

* :class:`HFCLIPScorer` -- a local transformers CLIP folder (``CLIPModel`` + ``CLIPProcessor``
  saved with ``save_pretrained``), wrapping ``torchmetrics.multimodal.CLIPScore``;
* :class:`OpenClipScorer` -- an open_clip architecture with a local checkpoint.

Images are float ``[N,3,H,W]`` tensors in [0,1].  The transformers backend rounds them to
uint8 [0,255] before the processor, as the diffusers evaluation guide does.

Note: torchmetrics' ``CLIPScore.compute`` clamps the *mean* of the unclamped per-image
scores at 0, while :meth:`score` clamps each image.  The two agree whenever no image has a
negative cosine (the normal case for real CLIP models and real prompts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import DataError, ModelLoadError
from fastgen.evaluation.hps import HPS_MEAN, HPS_STD, hps_preprocess, load_open_clip_model

CONVENTION = "max(100 * cos(E_image, E_text), 0) per image; mean over images (torchmetrics CLIPScore)"
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_HF_HINT = (
    "expected a transformers CLIP folder with config.json, model.safetensors (or pytorch_model.bin) and the "
    "processor files (preprocessor_config.json or processor_config.json, tokenizer.json or vocab.json + "
    "merges.txt), e.g. openai/clip-vit-large-patch14 from the Hugging Face Hub saved locally with "
    "CLIPModel.save_pretrained(folder) and CLIPProcessor.save_pretrained(folder)"
)


def as_feature_tensor(output: Any) -> torch.Tensor:
    """The projected features of a transformers CLIP ``get_image_features``/``get_text_features`` call:
    a ``ModelOutput`` in transformers >= 5 (its ``pooler_output``), a tensor in older versions."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    return output[0] if isinstance(output, tuple) else output


def _check_pair(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"expected images of shape [N,3,H,W] in [0,1], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise DataError(f"{images.shape[0]} images but {len(prompts)} prompts: image i is scored against prompt i")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8 in [0,255] (clamped, rounded)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class _FeatureCLIP(torch.nn.Module):
    """Adapter whose ``get_*_features`` return plain projected-feature tensors (what torchmetrics expects)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.clip = model

    @property
    def config(self) -> Any:
        return self.clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return as_feature_tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return as_feature_tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class HFCLIPScorer:
    """CLIP score with a local transformers CLIP model, via torchmetrics' ``CLIPScore``."""

    def __init__(self, model: torch.nn.Module, processor: Any, name: str, device: str | torch.device = "cpu") -> None:
        from torchmetrics.multimodal import CLIPScore

        self.device = torch.device(device)
        self.model = _FeatureCLIP(model).to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.metric = CLIPScore(model_name_or_path=lambda: (self.model, self.processor))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> HFCLIPScorer:
        """Load ``CLIPModel`` and ``CLIPProcessor`` from a local folder (never from the network)."""
        from transformers import CLIPModel, CLIPProcessor

        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"CLIP folder {path} not found; {_HF_HINT}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; {_HF_HINT}")
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise ModelLoadError(f"{path} has no weights file (model.safetensors or pytorch_model.bin); {_HF_HINT}")
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load CLIPModel from {path}: {exc}; {_HF_HINT}") from exc
        try:
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load CLIPProcessor from {path}: {exc}; {_HF_HINT}") from exc
        return cls(model, processor, name=path.name, device=device)

    def _text_inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize like torchmetrics: pad to the longest prompt, cut to the model's position limit."""
        enc = self.processor(text=prompts, return_tensors="pt", padding=True)
        limit = int(self.model.config.text_config.max_position_embeddings)
        return enc["input_ids"][..., :limit], enc["attention_mask"][..., :limit]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], clamp: bool = True, batch_size: int = 64) -> torch.Tensor:
        """Per-image CLIP score ``[N]`` (``max(100*cos, 0)``; ``clamp=False`` keeps ``100*cos``)."""
        _check_pair(images, prompts)
        out: list[torch.Tensor] = []
        for start in range(0, images.shape[0], batch_size):
            batch = to_uint8(images[start : start + batch_size]).cpu()
            pixels = self.processor(images=list(batch), return_tensors="pt")["pixel_values"]
            img = self.model.get_image_features(pixels.to(self.device))
            ids, mask = self._text_inputs(list(prompts[start : start + batch_size]))
            txt = self.model.get_text_features(ids.to(self.device), mask.to(self.device))
            img = img / img.norm(p=2, dim=-1, keepdim=True)
            txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
            out.append(100 * (img * txt).sum(dim=-1).float().cpu())
        scores = torch.cat(out)
        return scores.clamp(min=0) if clamp else scores

    @torch.no_grad()
    def torchmetrics_score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean CLIP score computed by ``torchmetrics.multimodal.CLIPScore`` itself."""
        _check_pair(images, prompts)
        self.metric.reset()
        self.metric.update(to_uint8(images).to(self.device), list(prompts))
        return float(self.metric.compute())

    def describe(self) -> dict[str, str]:
        return {
            "metric": "clip_score",
            "backend": "transformers (torchmetrics CLIPScore)",
            "model": self.name,
            "convention": CONVENTION,
            "preprocessing": "images rounded to uint8 [0,255], then the folder's CLIPProcessor",
        }


class OpenClipScorer:
    """CLIP score with an open_clip architecture and a local checkpoint."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_name: str,
        checkpoint: str,
        mean: tuple[float, ...] = HPS_MEAN,
        std: tuple[float, ...] = HPS_STD,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.checkpoint = checkpoint
        size = getattr(model.visual, "image_size", 224)
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ModelLoadError(f"{model_name} has a non-square image size {tuple(size)}; only square inputs work")
            size = size[0]
        self.image_size = int(size)
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_checkpoint(
        cls,
        model_name: str,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> OpenClipScorer:
        """Build ``model_name`` (no pretrained tag) and load ``path`` with strict keys.

        Mean/std default to the model's open_clip preprocessing config (OpenAI CLIP values
        unless the architecture config says otherwise); pass them for checkpoints trained
        with other statistics.
        """
        import open_clip

        ckpt = Path(path).expanduser()
        if not ckpt.is_file():
            raise ModelLoadError(
                f"open_clip checkpoint {ckpt} not found for {model_name}; download the weights file "
                f"(e.g. open_clip_pytorch_model.bin or open_clip_model.safetensors from the model's Hugging Face "
                f"repo) and pass its path"
            )
        model = load_open_clip_model(model_name, ckpt, device=device, dtype=dtype)
        cfg = open_clip.get_model_preprocess_cfg(model)
        return cls(
            model,
            open_clip.get_tokenizer(model_name),
            model_name,
            ckpt.name,
            mean=tuple(mean if mean is not None else cfg.get("mean", HPS_MEAN)),
            std=tuple(std if std is not None else cfg.get("std", HPS_STD)),
        )

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], clamp: bool = True) -> torch.Tensor:
        """Per-image CLIP score ``[N]`` (``max(100*cos, 0)``; ``clamp=False`` keeps ``100*cos``)."""
        _check_pair(images, prompts)
        param = next(self.model.parameters())
        pixels = hps_preprocess(images.to(param.device).float(), self.image_size, self.mean, self.std)
        img = self.model.encode_image(pixels.to(param.dtype), normalize=True)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(param.device), normalize=True)
        scores = 100 * (img * txt.to(img.dtype)).sum(dim=-1).float().cpu()
        return scores.clamp(min=0) if clamp else scores

    def describe(self) -> dict[str, str]:
        return {
            "metric": "clip_score",
            "backend": "open_clip",
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "convention": CONVENTION,
            "preprocessing": f"resize shortest edge to {self.image_size} (bicubic, antialias) + center crop "
            f"{self.image_size} + mean {self.mean} / std {self.std}",
        }
