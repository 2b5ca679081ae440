"""Expert reward models over pixels: HPSv2.1, PickScore and CLIP score.

Every reward here is the cosine similarity of the L2-normalised image and text embeddings of a
CLIP-like model (``logit_scale`` is *not* applied; :meth:`RewardModel.preference_scale` returns it
for trainers that need Bradley-Terry logits).  Images are float ``[N,3,H,W]`` tensors in [0,1];
preprocessing is made of differentiable tensor ops, so rewards backpropagate to the pixels.  Text
features are computed without gradients and cached per prompt string.

Nothing is downloaded: weights come from local files, or from the local Hugging Face cache when
no path is given.

* ``hpsv2``     -- :class:`HPSReward`, the HPSv2 / HPSv2.1 open_clip ViT-H-14 (``xswu/HPSv2``);
* ``pickscore`` -- :class:`PickScoreReward`, transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1``
  with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
* ``clip``      -- :class:`CLIPReward`, any open_clip architecture with a local checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastgen.errors import ModelLoadError
from fastgen.evaluation.clip_score import OpenClipScorer, as_feature_tensor
from fastgen.evaluation.hps import HPSScorer, hps_preprocess
from fastgen.rewards.base import RewardModel, register_reward

COSINE = "reward = cosine similarity of the L2-normalised image and text embeddings (logit_scale not applied)"

PICKSCORE_MODEL_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPEN_CLIP_H14_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_SAVE_HINT = (
    "save it on a machine with internet with huggingface_hub.snapshot_download(repo_id, local_dir=folder) "
    "or from_pretrained(repo_id).save_pretrained(folder), copy the folder here and pass its path"
)

# PIL resampling codes (as stored in preprocessor configs) -> torchvision interpolation, as the
# transformers torchvision backend maps them.
_RESAMPLE = {
    0: InterpolationMode.NEAREST_EXACT,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
}


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id`` in the local Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, no hub library, offline errors: the caller reports
        return None


def _cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except Exception:
        return None
    for name in filenames:
        try:
            cached = try_to_load_from_cache(repo_id, name)
        except Exception:
            continue
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    return None


# --------------------------------------------------------------------------- HPSv2


class HPSReward(RewardModel):
    """HPSv2 / HPSv2.1: raw cosine of :class:`fastgen.evaluation.hps.HPSScorer` (not x100).

    ``checkpoint`` is the ``HPS_v2.1_compressed.pt`` file or a folder holding it; without it the
    file is looked up in ``$HPS_ROOT`` (default ``~/.cache/hpsv2``) and the local Hugging Face cache.
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        version: str = "v2.1",
        model_name: str = "ViT-H-14",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.scorer = HPSScorer.from_checkpoint(checkpoint, version=version, model_name=model_name, device=device)
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The HPS evaluation transform on tensors (:func:`fastgen.evaluation.hps.hps_preprocess`)."""
        return hps_preprocess(images)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        param = _param(self.scorer.model)
        pixels = self.preprocess(images.to(device=param.device, dtype=torch.float32))
        return self.scorer.score_pixels(pixels, list(prompts)).float()

    def preference_scale(self) -> float:
        return float(self.scorer.model.logit_scale.detach().exp())

    def describe(self) -> dict:
        return {
            "reward": self.name,
            "version": self.scorer.version,
            "model": self.scorer.model_name,
            "checkpoint": self.scorer.checkpoint,
            "preprocessing": "resize shortest edge to 224 (bicubic, antialias) + center crop 224 + CLIP mean/std",
            "definition": COSINE + "; the HPS benchmark reports it x100",
        }


# --------------------------------------------------------------------------- CLIP (open_clip)


class _CachedTextCosineReward(RewardModel):
    """Cosine of normalised image and text embeddings of a CLIP-style ``self.model``; each distinct
    prompt's text embedding is computed once (:meth:`_encode_texts`) and kept."""

    def _init_text_cache(self) -> None:
        self._text_cache: dict[str, torch.Tensor] = {}

    def _encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Normalised text embeddings ``[len(prompts), D]`` of new prompts."""
        raise NotImplementedError

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``[B, D]`` of preprocessed pixels."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings ``[len(prompts), D]``; each distinct prompt is encoded once."""
        device = _param(self.model).device
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            for prompt, feat in zip(todo, self._encode_texts(todo, device)):
                self._text_cache[prompt] = feat.detach()
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        param = _param(self.model)
        pixels = self.preprocess(images.to(device=param.device, dtype=torch.float32))
        img = self._encode_images(pixels.to(param.dtype))
        txt = self.encode_text(list(prompts)).to(img.dtype)
        return (img * txt).sum(dim=-1).float()

    def preference_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class CLIPReward(_CachedTextCosineReward):
    """CLIP score of an open_clip architecture with a local checkpoint (raw cosine, not x100).

    ``checkpoint`` is a local weights file (``open_clip_pytorch_model.bin`` /
    ``open_clip_model.safetensors``); loaded with ``pretrained=None`` and strict keys.  Without it,
    ViT-H-14 weights are looked up in the local Hugging Face cache of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    name = "clip"

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if checkpoint is None:
            cached = _cached_hub_file(OPEN_CLIP_H14_REPO, _OPEN_CLIP_FILES) if model_name == "ViT-H-14" else None
            if cached is None:
                raise ModelLoadError(
                    f"clip reward: no checkpoint given for open_clip model {model_name!r}; pass checkpoint=<local "
                    f"weights file>, e.g. {' or '.join(_OPEN_CLIP_FILES)} from the Hugging Face repo "
                    f"{OPEN_CLIP_H14_REPO} (for ViT-H-14), downloaded on a machine with internet"
                )
            checkpoint = cached
        scorer = OpenClipScorer.from_checkpoint(model_name, checkpoint, device=device)
        self.model = scorer.model
        self.tokenizer = scorer.tokenizer
        self.model_name, self.checkpoint = model_name, scorer.checkpoint
        self.image_size, self.mean, self.std = scorer.image_size, scorer.mean, scorer.std
        self._init_text_cache()
        self.freeze()

    def _encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return hps_preprocess(images, self.image_size, self.mean, self.std)

    def describe(self) -> dict:
        return {
            "reward": self.name,
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "preprocessing": f"resize shortest edge to {self.image_size} (bicubic, antialias) + center crop "
            f"{self.image_size} + mean {self.mean} / std {self.std}",
            "definition": COSINE,
        }


# --------------------------------------------------------------------------- PickScore (transformers)


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` or ``obj.key`` (size dicts are plain dicts or transformers ``SizeDict``), else None."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


class ProcessorImageTransform:
    """Differentiable tensor re-implementation of a transformers ``CLIPImageProcessor``.

    Reproduces the processor's arithmetic on images in [0,1] (the processor's uint8 input / 255):
    resize (``size["shortest_edge"]`` keeping the aspect ratio with the long edge truncated to an
    int, or ``size["height"/"width"]``), centre crop with floored offsets (zero padding when the crop
    is larger), rescale and normalise with the processor's own mean/std.  All values are read from
    the processor, none is hard-coded.

    ``emulate_uint8=True`` (default) follows what the processor does with PIL / uint8 images, as
    PickScore was trained and evaluated: the resize runs width first and then height, each pass
    clamped to the valid range, so bicubic overshoot at sharp edges is cut as the uint8 kernel cuts
    it; only the per-pass rounding to whole grey levels is left out (about one grey level of
    difference).  ``emulate_uint8=False`` is the processor applied to float images in [0,1] with
    ``do_rescale=False`` (one joint float resize, no clamping).
    """

    def __init__(self, image_processor: Any, emulate_uint8: bool = True) -> None:
        ip = image_processor
        self.emulate_uint8 = emulate_uint8
        self.do_resize = bool(getattr(ip, "do_resize", True))
        self.do_center_crop = bool(getattr(ip, "do_center_crop", True))
        self.do_rescale = bool(getattr(ip, "do_rescale", True))
        self.do_normalize = bool(getattr(ip, "do_normalize", True))
        self.rescale_factor = float(getattr(ip, "rescale_factor", 1 / 255))
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        self.shortest_edge = _field(size, "shortest_edge")
        self.resize_hw = (_field(size, "height"), _field(size, "width"))
        if self.do_resize and not self.shortest_edge and not all(self.resize_hw):
            raise ModelLoadError(f"unsupported image processor size {size!r}: expected shortest_edge or height/width")
        if self.do_resize and self.shortest_edge and _field(size, "longest_edge"):
            raise ModelLoadError(f"unsupported image processor size {size!r}: shortest_edge with longest_edge")
        self.crop_hw = (_field(crop, "height"), _field(crop, "width"))
        if self.do_center_crop and not all(self.crop_hw):
            raise ModelLoadError(f"unsupported image processor crop_size {crop!r}: expected height and width")
        resample = getattr(ip, "resample", 3)
        if isinstance(resample, InterpolationMode):
            self.interpolation = resample
        else:
            code = int(getattr(resample, "value", resample))
            if code not in _RESAMPLE:
                raise ModelLoadError(
                    f"image processor resample={resample!r} has no differentiable tensor equivalent here "
                    f"(supported: nearest, bilinear, bicubic)"
                )
            self.interpolation = _RESAMPLE[code]
        self.mean = tuple(float(v) for v in getattr(ip, "image_mean"))
        self.std = tuple(float(v) for v in getattr(ip, "image_std"))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step (the processor's ``get_resize_output_image_size``)."""
        if not self.do_resize:
            return height, width
        if not self.shortest_edge:
            return int(self.resize_hw[0]), int(self.resize_hw[1])
        s = int(self.shortest_edge)
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.do_resize:
            size = list(self.output_size(*x.shape[-2:]))
            if self.emulate_uint8:
                # the processor resizes uint8 images width first, then height, each pass clamped to
                # [0, 255] (and rounded; rounding is left out here as it would zero every gradient)
                if size[1] != x.shape[-1]:
                    x = TF.resize(x, [x.shape[-2], size[1]], interpolation=self.interpolation, antialias=True)
                    x = x.clamp(0.0, 1.0)
                if size[0] != x.shape[-2]:
                    x = TF.resize(x, size, interpolation=self.interpolation, antialias=True).clamp(0.0, 1.0)
            elif size != list(x.shape[-2:]):
                x = TF.resize(x, size, interpolation=self.interpolation, antialias=True)
        if self.do_center_crop:
            ch, cw = int(self.crop_hw[0]), int(self.crop_hw[1])
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
                x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
                h, w = x.shape[-2:]
            top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
            x = x[..., top : top + ch, left : left + cw]
        if self.do_rescale:
            x = x * (255.0 * self.rescale_factor)
        if self.do_normalize:
            m = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            s = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - m) / s
        return x

    def describe(self) -> str:
        if not self.do_resize:
            resize = "no resize"
        elif self.shortest_edge:
            resize = f"resize shortest edge to {self.shortest_edge} ({self.interpolation.value}, antialias)"
        else:
            resize = f"resize to {self.resize_hw[0]}x{self.resize_hw[1]} ({self.interpolation.value}, antialias)"
        crop = f" + center crop {self.crop_hw[0]}x{self.crop_hw[1]}" if self.do_center_crop else ""
        norm = f" + mean {self.mean} / std {self.std}" if self.do_normalize else ""
        mode = "uint8-style passes: width then height, each clamped to [0,1]" if self.emulate_uint8 else "float"
        return resize + crop + norm + f" (CLIPImageProcessor arithmetic on tensors, {mode})"


def _pickscore_model_folder(model: str | os.PathLike[str] | None) -> Path:
    hint = f"the PickScore model is the Hugging Face repo {PICKSCORE_MODEL_REPO}; {_SAVE_HINT}"
    if model is None:
        cached = _cached_hub_snapshot(PICKSCORE_MODEL_REPO)
        if cached is None:
            raise ModelLoadError(f"pickscore: no model folder given and {PICKSCORE_MODEL_REPO} is not in the local "
                                 f"Hugging Face cache; {hint}")
        path = cached
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"PickScore model folder {path} not found (expected config.json and model.safetensors "
                             f"or pytorch_model.bin); {hint}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"PickScore model folder {path} has no config.json; {hint}")
    if not any((path / name).is_file() for name in _HF_WEIGHT_FILES):
        raise ModelLoadError(f"PickScore model folder {path} has no weights file (model.safetensors or "
                             f"pytorch_model.bin); {hint}")
    return path


def _has_processor_files(path: Path) -> bool:
    return any((path / n).is_file() for n in _PROCESSOR_CONFIGS) and any((path / n).is_file() for n in _TOKENIZER_FILES)


def _pickscore_processor_folder(processor: str | os.PathLike[str] | None, model_folder: Path) -> Path:
    hint = (f"PickScore uses the processor of the Hugging Face repo {PICKSCORE_PROCESSOR_REPO} "
            f"(preprocessor_config.json + tokenizer files); {_SAVE_HINT}")
    if processor is None:
        if _has_processor_files(model_folder):
            return model_folder
        cached = _cached_hub_snapshot(PICKSCORE_PROCESSOR_REPO)
        if cached is None:
            raise ModelLoadError(f"pickscore: no processor folder given, {model_folder} holds no preprocessor_config.json "
                                 f"and {PICKSCORE_PROCESSOR_REPO} is not in the local Hugging Face cache; {hint}")
        path = cached
    else:
        path = Path(processor).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"PickScore processor folder {path} not found; {hint}")
    if not any((path / n).is_file() for n in _PROCESSOR_CONFIGS):
        raise ModelLoadError(f"PickScore processor folder {path} has no preprocessor_config.json (or processor_config.json); {hint}")
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise ModelLoadError(f"PickScore processor folder {path} has no tokenizer files (tokenizer.json or vocab.json + "
                             f"merges.txt); {hint}")
    return path


def _weights_name(folder: Path) -> str:
    return next((n for n in _HF_WEIGHT_FILES if (folder / n).is_file()), "?")


class PickScoreReward(_CachedTextCosineReward):
    """PickScore: cosine of the normalised embeddings of the fine-tuned CLIP-H ``PickScore_v1``.

    ``model`` is a local folder of ``yuvalkirstain/PickScore_v1`` and ``processor`` one of the
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (defaults: the model folder when it holds
    processor files, else the local Hugging Face cache).  Text: the processor's tokenizer with
    ``padding="max_length", truncation=True, max_length=77``.  Images go through
    :class:`ProcessorImageTransform` (``emulate_uint8`` as there).  The published score is
    ``logit_scale.exp() * reward`` (:meth:`preference_scale`).
    """

    name = "pickscore"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        processor: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        max_length: int = 77,
        emulate_uint8: bool = True,
    ) -> None:
        super().__init__()
        from transformers import AutoProcessor, CLIPModel, CLIPProcessor

        model_folder = _pickscore_model_folder(model)
        proc_folder = _pickscore_processor_folder(processor, model_folder)
        try:
            clip = CLIPModel.from_pretrained(str(model_folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load the PickScore CLIPModel from {model_folder}: {exc}") from exc
        try:
            proc = AutoProcessor.from_pretrained(str(proc_folder), local_files_only=True)
        except Exception:
            try:
                proc = CLIPProcessor.from_pretrained(str(proc_folder), local_files_only=True)
            except Exception as exc:
                raise ModelLoadError(f"could not load the PickScore processor from {proc_folder}: {exc}") from exc
        image_processor = getattr(proc, "image_processor", None)
        tokenizer = getattr(proc, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ModelLoadError(f"the processor in {proc_folder} ({type(proc).__name__}) lacks an image processor or "
                                 f"a tokenizer; expected a CLIPProcessor")
        self.model = clip.to(device).eval()
        self.processor = proc
        self.tokenizer = tokenizer
        self.transform = ProcessorImageTransform(image_processor, emulate_uint8=emulate_uint8)
        limit = getattr(getattr(clip.config, "text_config", None), "max_position_embeddings", max_length)
        self.max_length = int(min(max_length, limit))
        self.model_name, self.processor_name = model_folder.name, proc_folder.name
        self.checkpoint = _weights_name(model_folder)
        self._init_text_cache()
        self.freeze()

    def _encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        feats = as_feature_tensor(self.model.get_text_features(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)))
        return feats / feats.norm(p=2, dim=-1, keepdim=True)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        img = as_feature_tensor(self.model.get_image_features(pixel_values=pixels))
        return img / img.norm(p=2, dim=-1, keepdim=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform(images)

    def describe(self) -> dict:
        return {
            "reward": self.name,
            "model": self.model_name,
            "processor": self.processor_name,
            "checkpoint": self.checkpoint,
            "preprocessing": self.transform.describe(),
            "definition": COSINE + "; PickScore reports logit_scale.exp() x cosine",
        }


register_reward("hpsv2", HPSReward)
register_reward("pickscore", PickScoreReward)
register_reward("clip", CLIPReward)
