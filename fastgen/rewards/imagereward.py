"""ImageReward (BLIP ViT-L/16 + BERT cross-encoder + MLP head) as a differentiable reward, from local files.

The ``image-reward`` pip package (v1.5) is not used: it pins ``timm==0.6.13`` and ``fairscale==0.4.13``
(plus diffusers/datasets/accelerate) and its loader calls ``BertTokenizer.from_pretrained('bert-base-uncased')``
and ``hf_hub_download`` at load time, so it cannot run offline against this project's fixed dependencies.

Instead the network is rebuilt from transformers' BLIP building blocks and the original checkpoint is
renamed on load:

* visual encoder (timm-style ViT, ``blip.visual_encoder.*``) -> :class:`transformers.BlipVisionModel`
  (``vision.*``).  Both use a fused ``qkv`` Linear laid out as ``[q; k; v]`` rows with heads contiguous,
  pre-norm blocks, exact GELU and a final LayerNorm applied to every token; ``cls_token`` and ``pos_embed``
  are ``[1,1,D]`` / ``[1,1+P,D]`` parameters on both sides, so they copy without reshaping.
* text encoder (BLIP's ``med.py`` BERT with cross-attention, ``blip.text_encoder.*``) ->
  :class:`transformers.BlipTextModel` (``text.*``), whose parameter names are identical to ``med.py``'s.
  ``BlipTextModel`` builds cross-attention layers when ``is_decoder`` is set in its config, and applies them
  whenever ``encoder_hidden_states`` are passed; it is run with ``is_decoder=False`` (bidirectional mask).
* the MLP head (``mlp.layers.{0,2,4,6,7}``) keeps its original layout (``mlp.layers.*``).

Loading is strict: after renaming, every parameter must be present and nothing else may be left, except the
keys the original ``ImageReward`` module carries but never uses to score (``blip.vision_proj.*``,
``blip.text_proj.*`` and the ``blip.text_encoder.embeddings.position_ids`` buffer).

The score follows ``ImageReward.score_gard``: the prompt is tokenised (``max_length`` 35, padded, truncated),
its first token replaced by ``[ENC]``, the text encoder cross-attends to all image tokens, the ``[CLS]`` feature
goes through the MLP, and the output is standardised with ImageReward's mean/std.  As in RG-LCD the
standardised reward is capped (``min(r, cap)``, default 2.0) so that it cannot be hacked upwards without bound.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from fastgen.errors import DataError, ModelLoadError
from fastgen.rewards.base import RewardModel, register_reward

#: ImageReward's standardisation of the raw MLP output (``ImageReward.mean`` / ``ImageReward.std``).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
#: The CLIP normalisation ImageReward's preprocessing uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
MAX_LENGTH = 35
DEFAULT_CAP = 2.0
CHECKPOINT_NAMES = ("ImageReward.pt", "ImageReward.safetensors")
MED_CONFIG_NAME = "med_config.json"
TOKENIZER_DIRS = ("bert-base-uncased", "tokenizer")
DEFAULT_DIR = "~/.cache/ImageReward"
HEAD_WIDTHS = (1024, 128, 64, 16)
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"

_SOURCE_HINT = (
    "ImageReward.pt and med_config.json come from https://huggingface.co/THUDM/ImageReward "
    "(the image-reward package caches them in ~/.cache/ImageReward)"
)
_TOKENIZER_HINT = (
    "pass tokenizer=<folder> holding the bert-base-uncased tokenizer, written once with "
    "BertTokenizer.from_pretrained('bert-base-uncased').save_pretrained(folder) "
    f"(or put it in a '{TOKENIZER_DIRS[0]}' folder next to ImageReward.pt); nothing is downloaded at load time"
)


# --------------------------------------------------------------------------- preprocessing


def imagereward_preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N,3,H,W]`` images in [0,1] -> normalised ``[N,3,size,size]`` inputs, differentiably.

    The tensor counterpart of ImageReward's ``Resize(size, BICUBIC) -> CenterCrop(size) -> ToTensor ->
    Normalize(CLIP)``: shortest edge resized to ``size`` (bicubic, antialiased, aspect kept), clamped to
    [0,1] (PIL clips its bicubic overshoot too), centre crop, ``(x - mean) / std``.  The reference resizes a
    uint8 PIL image in two separable passes that round and clip after each pass; on smooth content this path
    agrees to about one uint8 level (0.016 after normalisation), at saturated hard edges PIL's clipped
    intermediate pass can differ by more.  Images already ``size`` px on their short edge are not resampled
    and agree exactly.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"expected images of shape [N,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise DataError(f"expected float images in [0,1], got dtype {images.dtype}")
    x = images
    if min(x.shape[-2:]) != size:
        x = TF.resize(x, [size], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0.0, 1.0)
    x = TF.center_crop(x, [size, size])
    m = torch.as_tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def imagereward_preprocess_pil(image: Any, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One PIL image -> ``[3,size,size]``, in exactly the reference order (PIL bicubic resize on the
    uint8 image, centre crop, RGB conversion, ``ToTensor``, normalise); not differentiable."""
    img = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [size, size]).convert("RGB")
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


# --------------------------------------------------------------------------- checkpoint layout

# (original name under ``blip.visual_encoder.``, ours under ``vision.``); {i} a block index, {p} weight|bias
_VISION_RULES: list[tuple[str, str]] = [
    ("cls_token", "embeddings.class_embedding"),  # [1,1,D] on both sides
    ("pos_embed", "embeddings.position_embedding"),  # [1,1+P,D] on both sides
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),  # fused [q; k; v] on both sides
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.{fc}.{p}", "encoder.layers.{i}.mlp.{fc}.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
_FIELDS = {"i": r"\d+", "p": "weight|bias", "fc": "fc1|fc2"}
_VISION_PREFIX, _TEXT_PREFIX = "blip.visual_encoder.", "blip.text_encoder."
#: Keys of the original ``ImageReward`` module that the score never reads.
IGNORED_ORIGINAL_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    rx = "".join(re.escape(x) if n % 2 == 0 else f"(?P<{x}>{_FIELDS[x]})" for n, x in enumerate(parts))
    return re.compile(f"^{rx}$")


_VISION_FWD = [(_template_regex(a), b) for a, b in _VISION_RULES]
_VISION_BWD = [(_template_regex(b), a) for a, b in _VISION_RULES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for rx, template in rules:
        m = rx.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def _to_ours(key: str) -> str | None:
    """Our name for one original key, ``None`` for an ignored one; unknown keys come back unchanged."""
    if IGNORED_ORIGINAL_KEYS.search(key):
        return None
    if key.startswith(_VISION_PREFIX):
        new = _rename(key[len(_VISION_PREFIX) :], _VISION_FWD)
        return key if new is None else "vision." + new
    if key.startswith(_TEXT_PREFIX):  # med.py's BERT and BlipTextModel share parameter names
        return "text." + key[len(_TEXT_PREFIX) :]
    return key  # mlp.layers.* keeps its name; anything else stays as it is and is reported as unexpected


def _to_original(key: str) -> str:
    if key.startswith("vision."):
        old = _rename(key[len("vision.") :], _VISION_BWD)
        return key if old is None else _VISION_PREFIX + old
    if key.startswith("text."):
        return _TEXT_PREFIX + key[len("text.") :]
    return key


def convert_imagereward_state_dict(sd: dict) -> dict:
    """An ``ImageReward.pt`` state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``)
    in this module's layout (``vision.*``, ``text.*``, ``mlp.layers.*``).

    Keys already in our layout pass through; the unused ``vision_proj``/``text_proj``/``position_ids`` keys
    are dropped; any other key keeps its name, so a strict load reports it as unexpected.
    """
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    out: dict = {}
    for k, v in sd.items():
        new = _to_ours(k)
        if new is not None:
            out[new] = v
    return out


def to_original_layout(sd: dict) -> dict:
    """Inverse of :func:`convert_imagereward_state_dict`: our layout -> the original checkpoint's names."""
    return {_to_original(k): v for k, v in sd.items()}


# --------------------------------------------------------------------------- model


def _head(in_features: int) -> nn.Sequential:
    """ImageReward's MLP: linear layers only (no activations), dropouts at indices 1, 3, 5."""
    w = (in_features, *HEAD_WIDTHS)
    return nn.Sequential(
        nn.Linear(w[0], w[1]), nn.Dropout(0.2),
        nn.Linear(w[1], w[2]), nn.Dropout(0.2),
        nn.Linear(w[2], w[3]), nn.Dropout(0.1),
        nn.Linear(w[3], w[4]),
        nn.Linear(w[4], 1),
    )


class _Head(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.layers = _head(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def vision_config_for(image_size: int = IMAGE_SIZE, patch_size: int = 16, hidden_size: int = 1024,
                      num_hidden_layers: int = 24, num_attention_heads: int = 16, intermediate_size: int = 4096,
                      layer_norm_eps: float = 1e-6, **extra):
    """A :class:`transformers.BlipVisionConfig` of BLIP's timm ViT; the defaults are ImageReward's ViT-L/16."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            intermediate_size=intermediate_size, layer_norm_eps=layer_norm_eps,
                            hidden_act="gelu", attention_dropout=0.0, **extra)


def text_config_from_med(med: dict, encoder_width: int, tokenizer: Any = None):
    """A :class:`transformers.BlipTextConfig` from a BLIP ``med_config.json`` dict.

    ``encoder_width`` is the visual encoder's width: BLIP overrides the json's ``encoder_width`` with it.
    """
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise ModelLoadError("med_config.json has no 'add_cross_attention': true; ImageReward's text encoder "
                             f"cross-attends to the image ({_SOURCE_HINT})")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"med_config.json: position_embedding_type {med['position_embedding_type']!r} "
                             "is not supported (ImageReward uses 'absolute')")
    try:
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        kw = {k: int(med[k]) for k in keys}
    except KeyError as exc:
        raise ModelLoadError(f"med_config.json lacks {exc.args[0]!r}: is it BLIP's BERT config? ({_SOURCE_HINT})")
    tok_ids = {}
    if tokenizer is not None:
        tok_ids = {"bos_token_id": tokenizer.convert_tokens_to_ids(DEC_TOKEN),
                   "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
    cfg = BlipTextConfig(
        **kw,
        encoder_hidden_size=int(encoder_width),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        hidden_act=str(med.get("hidden_act", "gelu")),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med.get("pad_token_id", 0)),
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally
        use_cache=False,
        **tok_ids,
    )
    cfg._attn_implementation = "eager"
    return cfg


def add_blip_special_tokens(tokenizer: Any) -> int:
    """Add BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens (idempotent); returns the ``[ENC]`` id."""
    if tokenizer.convert_tokens_to_ids(DEC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    enc = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    tokenizer.enc_token_id = enc
    return enc


class ImageRewardModel(RewardModel):
    """ImageReward's standardised score ``(mlp(feat) - mean) / std``, capped at ``cap`` (``None``: uncapped).

    ``forward(images [N,3,H,W] in [0,1], prompts) -> [N]`` is differentiable with respect to the images; the
    prompt only enters through token ids, so nothing text-side needs gradients.  Build it with
    :meth:`from_pretrained`; the constructor makes a randomly initialised network of the given configs.
    """

    name = "imagereward"

    def __init__(self, vision_config, text_config, tokenizer, cap: float | None = DEFAULT_CAP,
                 max_length: int = MAX_LENGTH, source: str | None = None):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.enc_token_id = add_blip_special_tokens(tokenizer)
        if len(tokenizer) != text_config.vocab_size:
            raise ModelLoadError(
                f"the tokenizer has {len(tokenizer)} tokens with [DEC]/[ENC] added but the text encoder's vocab_size "
                f"is {text_config.vocab_size}: ImageReward needs the bert-base-uncased tokenizer ({_TOKENIZER_HINT})")
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ModelLoadError(f"text encoder_hidden_size {text_config.encoder_hidden_size} != visual width "
                                 f"{vision_config.hidden_size}")
        self.tokenizer = tokenizer
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = _Head(text_config.hidden_size)
        self.image_size = int(vision_config.image_size)
        self.max_length = int(max_length)
        self.cap = None if cap is None else float(cap)
        self.mean, self.std = IMAGEREWARD_MEAN, IMAGEREWARD_STD
        self.source = source
        self.freeze()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike | None = None, med_config: str | os.PathLike | None = None,
                        tokenizer: Any = None, device: str | torch.device = "cpu", cap: float | None = DEFAULT_CAP,
                        vision_config: dict | None = None) -> "ImageRewardModel":
        """Load ImageReward from local files.

        ``checkpoint``: ``ImageReward.pt`` (or ``.safetensors``), or a folder holding it and ``med_config.json``
        (default ``~/.cache/ImageReward``).  ``med_config``: BLIP's BERT config (default: next to the checkpoint).
        ``tokenizer``: a local bert-base-uncased tokenizer folder (or tokenizer object); default: a
        ``bert-base-uncased`` or ``tokenizer`` folder next to the checkpoint.  The vision config is read off the
        checkpoint's shapes (heads: width / 64, as in BLIP's ViT-B/L); ``vision_config`` overrides fields.
        """
        ckpt_path = _find_checkpoint(checkpoint)
        folder = ckpt_path.parent
        med_path = Path(med_config).expanduser() if med_config is not None else folder / MED_CONFIG_NAME
        if not med_path.is_file():
            raise ModelLoadError(f"{MED_CONFIG_NAME} not found at {med_path}: {_SOURCE_HINT}")
        try:
            med = json.loads(med_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read {med_path}: {exc}") from exc
        tok = _load_tokenizer(tokenizer, folder)

        sd = convert_imagereward_state_dict(_read_state_dict(ckpt_path))
        vcfg = vision_config_for(**{**_infer_vision(sd, ckpt_path), **(vision_config or {})})
        tcfg = text_config_from_med(med, vcfg.hidden_size, tok)
        model = cls(vcfg, tcfg, tok, cap=cap, source=str(ckpt_path))
        model.load_converted(sd, where=str(ckpt_path))
        return model.to(device).freeze()

    def load_converted(self, sd: dict, where: str = "state dict") -> None:
        """Strictly load a state dict in our layout; missing / unexpected / mis-shaped keys raise
        :class:`ModelLoadError` naming a few of them by their original names."""
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shapes = [f"{_to_original(k)} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: " + ", ".join(_to_original(k) for k in missing[:5]))
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:5]))
        if shapes:
            problems.append(f"{len(shapes)} with the wrong shape: " + ", ".join(shapes[:5]))
        if problems:
            raise ModelLoadError(f"{where} does not match ImageReward's architecture ({'; '.join(problems)}); "
                                 f"is it THUDM/ImageReward's ImageReward.pt with its med_config.json?")
        self.load_state_dict({k: v for k, v in sd.items()}, strict=True)

    # ------------------------------------------------------------------ scoring

    def tokenize(self, prompts: Sequence[str],
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[N, max_length]``: padded, truncated, first token ``[ENC]``."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = enc["input_ids"].clone()
        ids[:, 0] = self.enc_token_id
        device = device if device is not None else self.mlp.layers[0].weight.device
        return ids.to(device), enc["attention_mask"].to(device)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The text encoder's ``[ENC]``-position feature ``[N, hidden]`` (the MLP's input)."""
        self.check_inputs(images, prompts)
        p = self.vision.embeddings.patch_embedding.weight
        pixels = imagereward_preprocess(images.float(), self.image_size).to(p.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        ids, mask = self.tokenize(prompts, device=images.device)
        # the image attention mask is all ones: passing none is the same and skips building it
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds, is_decoder=False)
        return out.last_hidden_state[:, 0, :]

    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The MLP output before standardisation, ``[N]`` float32."""
        return self.mlp(self.features(images, prompts))[:, 0].float()

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        r = (raw - self.mean) / self.std
        if self.cap is not None:
            r = self.cap - F.relu(self.cap - r)  # min(r, cap), written as RG-LCD does
        return r

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.standardise(self.raw_scores(images, prompts))

    def preference_scale(self) -> float:
        """ImageReward is a Bradley-Terry model on raw MLP outputs, so a standardised difference times ``std``
        is the preference logit (exact below the cap)."""
        return float(self.std)

    def describe(self) -> dict:
        return {"reward": self.name,
                "definition": "(mlp(BLIP text-encoder [ENC] feature cross-attending to the image) - mean) / std"
                              + (f", capped at {self.cap}" if self.cap is not None else ""),
                "cap": self.cap, "mean": self.mean, "std": self.std, "image_size": self.image_size,
                "max_length": self.max_length, "checkpoint": self.source}


# --------------------------------------------------------------------------- file helpers


def _find_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    path = Path(checkpoint if checkpoint is not None else DEFAULT_DIR).expanduser()
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise ModelLoadError(f"{CHECKPOINT_NAMES[0]} not found in {path}: {_SOURCE_HINT}")
    if path.is_file():
        return path
    raise ModelLoadError(f"ImageReward checkpoint {path} does not exist: expected {CHECKPOINT_NAMES[0]} or a folder "
                         f"holding it and {MED_CONFIG_NAME}; {_SOURCE_HINT}")


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a checkpoint
        raise ModelLoadError(f"could not read ImageReward checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} holds no state dict of tensors ({_SOURCE_HINT})")
    return obj


def _infer_vision(sd: dict, where: Path) -> dict:
    """Vision config fields read off a converted state dict's shapes."""
    try:
        patch = sd["vision.embeddings.patch_embedding.weight"]
        pos = sd["vision.embeddings.position_embedding"]
        fc1 = sd["vision.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise ModelLoadError(f"{where} lacks {_to_original(exc.args[0])}: it is not an ImageReward checkpoint "
                             f"({_SOURCE_HINT})") from None
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1:
        raise ModelLoadError(f"{where}: pos_embed has {pos.shape[1]} positions, not 1 + a square number")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vision\.encoder\.layers\.(\d+)\.", k)))
    return {"image_size": grid * patch_size, "patch_size": patch_size, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "intermediate_size": int(fc1.shape[0])}


def _load_tokenizer(tokenizer: Any, folder: Path):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer  # an already-built tokenizer object
    candidates = [Path(tokenizer).expanduser()] if tokenizer is not None else [folder / d for d in TOKENIZER_DIRS]
    for cand in candidates:
        if cand.is_dir() and ((cand / "vocab.txt").is_file() or (cand / "tokenizer.json").is_file()):
            from transformers import BertTokenizer

            try:
                return BertTokenizer.from_pretrained(str(cand), local_files_only=True)
            except Exception as exc:
                raise ModelLoadError(f"could not read the bert-base-uncased tokenizer in {cand}: {exc}") from exc
    where = ", ".join(str(c) for c in candidates)
    raise ModelLoadError(f"no bert-base-uncased tokenizer folder (vocab.txt) at {where}: {_TOKENIZER_HINT}")


register_reward("imagereward", ImageRewardModel.from_pretrained)
