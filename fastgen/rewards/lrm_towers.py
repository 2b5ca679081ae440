"""The towers of a latent proxy reward model (:class:`fastgen.rewards.latent_proxy.LatentRewardModel`).

Image towers read diffusion-space latents ``[N, C, H, W]``; text towers read token ids and an
attention mask ``[N, L]``.  Each returns un-normalised features ``[N, embed_dim]``.

=====================  =========================================================================
image ``cnn``          conv stem, residual stages, global average pool, linear projection
image ``vit``          patchify conv, class token + learned positions, pre-norm transformer,
                       projection of the class token (RG-LCD's ``latent_ViT``: patch 4, width 512,
                       12 layers)
text ``transformer``   a small pre-norm transformer from scratch (the digits world: 2 layers,
                       64 wide, 16 tokens), mean over the real tokens
text ``clip``          a transformers ``CLIPTextModel`` (usually a copy of the teacher's own text
                       encoder: SD2.x's is OpenCLIP ViT-H/14's text tower), pooled at the EOS token
text ``open_clip``     an open_clip ``TextTransformer`` (e.g. ViT-H-14's, RG-LCD's text tower),
                       pooled at the EOS token
=====================  =========================================================================

The architecture of a ``clip`` / ``open_clip`` text tower is the ``text_config`` dict of the LRM
config (saved in its ``config.json``), so a saved LRM rebuilds without the teacher or a download.

Every tower exposes :meth:`parts` ``-> (stem, layers, head)`` (parameter lists, input to output), which
:func:`trainable_parameters` uses to unlock only the last layers (RG-LCD's ``lock_image_tower`` /
``unlocked_rm_text_layers``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.errors import ConfigError

__all__ = [
    "IMAGE_TOWERS",
    "TEXT_TOWERS",
    "build_image_tower",
    "build_text_tower",
    "clip_text_config",
    "open_clip_text_config",
    "trainable_parameters",
]

IMAGE_TOWERS = ("cnn", "vit")
TEXT_TOWERS = ("transformer", "clip", "open_clip")

# keys of a transformers config dict that describe the file or the outputs, not the architecture
_HF_FILE_KEYS = ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                 "_attn_implementation_autoset", "id2label", "label2id", "problem_type", "output_hidden_states",
                 "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder")


def _params(*items: Any) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, nn.Parameter):
            out.append(item)
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
        else:
            raise TypeError(f"not a module or parameter: {type(item).__name__}")
    return out


# --------------------------------------------------------------------------- image towers


def _groups(channels: int) -> int:
    """GroupNorm groups: as many as possible with at least 4 channels each (at most 32)."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class _CNNTower(nn.Module):
    """Conv stem, ``depth`` residual stages (stride-2 downsampling between them while the map is
    larger than 2x2), GroupNorm + SiLU, global average pool, linear projection."""

    def __init__(self, cfg: Any):
        super().__init__()
        w = cfg.width
        self.stem = nn.Conv2d(cfg.latent_channels, w, 3, padding=1)
        stages: list[nn.Module] = []
        size = cfg.latent_size
        for i in range(cfg.depth):
            stages.append(_ResBlock(w))
            if i < cfg.depth - 1 and size > 2:
                stages.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
                size = (size + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.norm = nn.GroupNorm(_groups(w), w)
        self.proj = nn.Linear(w, cfg.embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(z))
        h = F.silu(self.norm(h)).mean(dim=(-2, -1))
        return self.proj(h)

    def parts(self):
        # a "layer" is a residual block together with the downsampling that follows it
        layers: list[list[nn.Parameter]] = []
        for m in self.stages:
            if isinstance(m, _ResBlock) or not layers:
                layers.append(_params(m))
            else:
                layers[-1].extend(_params(m))
        return _params(self.stem), layers, _params(self.norm, self.proj)


def _encoder_layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True)


class _ViTTower(nn.Module):
    """Patchify conv, class token + learned positions, ``depth`` pre-norm transformer layers,
    final LayerNorm, projection of the class token."""

    def __init__(self, cfg: Any):
        super().__init__()
        w, p = cfg.width, cfg.patch_size
        n = (cfg.latent_size // p) ** 2
        self.patch = nn.Conv2d(cfg.latent_channels, w, p, stride=p)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.randn(1, n + 1, w) * 0.02)
        self.layers = nn.ModuleList([_encoder_layer(w, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.patch(z).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x[:, 0]))

    def parts(self):
        return _params(self.patch, self.cls, self.pos), [_params(m) for m in self.layers], _params(self.norm, self.proj)


def build_image_tower(cfg: Any) -> nn.Module:
    if cfg.tower == "cnn":
        return _CNNTower(cfg)
    if cfg.tower == "vit":
        return _ViTTower(cfg)
    raise ConfigError(f"LRM config: unknown tower {cfg.tower!r}; use one of {', '.join(IMAGE_TOWERS)}")


# --------------------------------------------------------------------------- text towers


class _TextTower(nn.Module):
    """Token embedding + learned positions, pre-norm transformer layers, final LayerNorm,
    mean over the real (non-padding) tokens, projection."""

    def __init__(self, cfg: Any):
        super().__init__()
        w = cfg.text_width
        self.token = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.token.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(1, cfg.text_max_length, w) * 0.01)
        self.layers = nn.ModuleList([_encoder_layer(w, cfg.text_heads) for _ in range(cfg.text_layers)])
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.pos[:, : ids.shape[1]]
        pad = mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.norm(x)
        m = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(pooled)

    def parts(self):
        return _params(self.token, self.pos), [_params(m) for m in self.layers], _params(self.norm, self.proj)


def clip_text_config(encoder: nn.Module) -> dict:
    """The ``text_config`` of a ``clip`` text tower copying ``encoder`` (a transformers
    ``CLIPTextModel`` or ``CLIPTextModelWithProjection``): its architecture as a JSON-able dict."""
    config = getattr(encoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in ("clip_text_model", "clip"):
        raise ConfigError(
            f"the teacher's text encoder is a {type(encoder).__name__}, not a CLIP text model; an LRM text tower "
            f"can be copied only from a CLIPTextModel (SD1.x/2.x/XL). Use text_tower=open_clip or "
            f"text_tower=transformer instead"
        )
    config = getattr(config, "text_config", config)
    return {k: v for k, v in config.to_dict().items() if k not in _HF_FILE_KEYS}


def _inner_clip(model: nn.Module) -> nn.Module:
    """The CLIP text transformer (embeddings, encoder, final_layer_norm) of a transformers CLIP text model
    (``model.text_model`` before transformers 5; the model itself from 5 on)."""
    return getattr(model, "text_model", model)


class CLIPTextTower(nn.Module):
    """A transformers CLIP text transformer (pooled at the EOS token) and a linear projection."""

    def __init__(self, cfg: Any):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        hf = CLIPTextConfig(**dict(cfg.text_config))
        # the inner transformer only, so saved keys (`encoder.embeddings...`) do not depend on the transformers version
        self.encoder = _inner_clip(CLIPTextModel(hf))
        self.proj = nn.Linear(int(hf.hidden_size), cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=ids, attention_mask=mask)
        return self.proj(out.pooler_output)

    def load_from(self, encoder: nn.Module) -> None:
        """Copy the weights of a transformers CLIP text model (the teacher's ``text_encoder``)."""
        source = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                  for k, v in encoder.state_dict().items() if not k.startswith("text_projection")}
        own = self.encoder.state_dict()
        source = {k: v for k, v in source.items() if k in own or not k.endswith("position_ids")}
        missing, unexpected = sorted(set(own) - set(source)), sorted(set(source) - set(own))
        if missing or unexpected:
            raise ConfigError(f"cannot copy the text encoder into the LRM: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.encoder.load_state_dict({k: source[k] for k in own}, strict=True)

    def parts(self):
        enc = self.encoder
        return (_params(enc.embeddings), [_params(m) for m in enc.encoder.layers],
                _params(enc.final_layer_norm, self.proj))


def open_clip_text_config(model_name: str, tokenizer: Any) -> dict:
    """The ``text_config`` of an ``open_clip`` text tower with the architecture of open_clip's ``model_name``
    (e.g. ``ViT-H-14``), pooled at ``tokenizer``'s EOS token (the same token open_clip's argmax pooling
    takes for CLIP's BPE vocabulary)."""
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open_clip is a dependency
        raise ConfigError("text_tower=open_clip needs the open_clip_torch package") from exc
    cfg = open_clip.get_model_config(model_name)
    if not cfg:
        raise ConfigError(f"open_clip has no model config {model_name!r}; pick one of open_clip.list_models(), "
                          f"e.g. ViT-H-14 (RG-LCD's text tower)")
    text_cfg = dict(cfg["text_cfg"])
    if text_cfg.get("hf_model_name"):
        raise ConfigError(f"open_clip model {model_name!r} has a Hugging Face text tower ({text_cfg['hf_model_name']}); "
                          f"only open_clip's own TextTransformer towers are supported")
    vocab = int(text_cfg.get("vocab_size", 49408))
    if len(tokenizer) != vocab:
        raise ConfigError(
            f"open_clip {model_name!r} has a {vocab}-token vocabulary but the teacher's tokenizer has {len(tokenizer)} "
            f"tokens; the LRM reads the teacher's token ids, so they must be the same vocabulary (CLIP BPE, e.g. SD2.x's "
            f"tokenizer with ViT-H-14). Use text_tower=teacher instead"
        )
    if text_cfg.get("pool_type", "argmax") in ("argmax", "eos"):
        text_cfg.update(pool_type="eos", eos_id=int(tokenizer.eos_token_id))
    return {"model_name": model_name, "embed_dim": int(cfg["embed_dim"]), "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "text_cfg": text_cfg}


class OpenCLIPTextTower(nn.Module):
    """An open_clip ``TextTransformer`` (its own projection to open_clip's ``embed_dim``) and a linear projection."""

    def __init__(self, cfg: Any):
        super().__init__()
        from open_clip.model import _build_text_tower

        tc = dict(cfg.text_config)
        self.encoder = _build_text_tower(int(tc["embed_dim"]), dict(tc["text_cfg"]), quick_gelu=bool(tc.get("quick_gelu")))
        self.proj = nn.Linear(int(tc["embed_dim"]), cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(ids))

    def load_from(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy the text tower's weights out of a full open_clip state dict (``CLIP`` keys at the top level,
        ``CustomTextCLIP`` keys under ``text.``; a ``module.`` prefix is dropped)."""
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        own = self.encoder.state_dict()
        for prefix in ("", "text."):
            picked = {k: state[prefix + k] for k in own if prefix + k in state}
            if len(picked) == len(own):
                shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in picked.items() if v.shape != own[k].shape]
                if shapes:
                    raise ConfigError(f"open_clip checkpoint {source} does not match the text tower config: {shapes[:4]}")
                self.encoder.load_state_dict(picked, strict=True)
                return
        missing = sorted(k for k in own if k not in state and "text." + k not in state)
        raise ConfigError(f"open_clip checkpoint {source} has no text tower of this architecture (missing {missing[:5]}); "
                          f"pass the checkpoint of the model named by open_clip_model")

    def parts(self):
        enc = self.encoder
        return (_params(enc.token_embedding, enc.positional_embedding), [_params(m) for m in enc.transformer.resblocks],
                _params(enc.ln_final, enc.text_projection, self.proj))


def build_text_tower(cfg: Any) -> nn.Module:
    kind = getattr(cfg, "text_tower", "transformer")
    if kind == "transformer":
        return _TextTower(cfg)
    if kind == "clip":
        return CLIPTextTower(cfg)
    if kind == "open_clip":
        return OpenCLIPTextTower(cfg)
    raise ConfigError(f"LRM config: unknown text_tower {kind!r}; use one of {', '.join(TEXT_TOWERS)}")


# --------------------------------------------------------------------------- unlocking


def trainable_parameters(tower: nn.Module, layers: int) -> list[nn.Parameter]:
    """The parameters of ``tower`` that train when only its last ``layers`` layers are unlocked:
    those layers and the head (final norm + projection); ``layers < 0``: every parameter."""
    if layers < 0:
        return list(tower.parameters())
    _, blocks, head = tower.parts()
    chosen = [p for block in (blocks[len(blocks) - layers:] if layers else []) for p in block]
    return chosen + list(head)
