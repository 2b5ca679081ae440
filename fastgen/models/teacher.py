"""A frozen diffusion teacher with one interface over SD1.x/2.x, SDXL, Flux, SD3 and PixArt.

:class:`Teacher` wraps a loaded diffusers pipeline (kept as is, components shared) and exposes
what distillation needs, in the *latent layout* ``[B, C, h, w]`` for every family:

* :meth:`Teacher.encode_prompt` -> :class:`PromptEmbeds` (text hidden states, pooled embedding
  and family-specific extras), computed exactly as the stock pipeline computes them;
* :meth:`Teacher.encode` / :meth:`Teacher.decode` between pixels in [-1, 1] and scaled
  (and shifted) latents;
* :meth:`Teacher.forward`, the raw network output for ``x_t`` at time ``t`` (Flux latents are
  packed into 2x2 tokens and unpacked inside);
* :meth:`Teacher.predict`, ``(x0, eps)`` with classifier-free guidance in a single batched
  network call.

Time follows the teacher's :class:`~fastgen.diffusion.NoiseSchedule`: integer timesteps in
``0..T-1`` for ``vp`` teachers (SD, SDXL, PixArt), ``sigma`` in ``[0, 1]`` for ``flow`` teachers
(Flux, SD3), with ``x_t = alpha_t * x0 + sigma_t * eps``.  For ``vp`` teachers ``x_t`` is the
variance-preserving sample, i.e. what the UNet sees *after* a scheduler's ``scale_model_input``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fastgen.diffusion import NoiseSchedule, to_x0_eps
from fastgen.errors import DataError, ResolutionError
from fastgen.models.loading import SUPPORTED_PIPELINES, family_of, load_pipeline

#: Network kind of each family.
FAMILY_KIND: dict[str, str] = {"sd": "unet", "sdxl": "unet", "flux": "dit", "sd3": "dit", "pixart": "dit"}

#: ``max_sequence_length`` used by the stock pipelines when none is given.
DEFAULT_MAX_SEQUENCE_LENGTH: dict[str, int] = {"flux": 512, "sd3": 256, "pixart_alpha": 120, "pixart_sigma": 300}

#: Embedded guidance of guidance-distilled Flux models when none is given (FluxPipeline's default).
DEFAULT_EMBEDDED_GUIDANCE = 3.5


# --------------------------------------------------------------------------- prompt embeddings


def _cat_optional(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError(
            f"cannot concatenate PromptEmbeds where only one side has {what}; encode both with the same "
            f"Teacher.encode_prompt (and the same height/width arguments)"
        )
    return torch.cat([a, b], dim=0)


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch, batch-first in every tensor.

    Attributes:
        hidden: ``[B, L, D]`` text hidden states (the network's ``encoder_hidden_states``).
        pooled: ``[B, P]`` pooled embedding (SDXL ``text_embeds``, Flux ``pooled_projections``,
            SD3 pooled CLIP-L+G) or ``None`` (SD1.x/2.x, PixArt).
        extra: further per-sample tensors, batch-first: ``"txt_ids"`` ``[B, L, 3]`` (Flux),
            ``"attention_mask"`` ``[B, L]`` (PixArt), ``"time_ids"`` ``[B, 6]`` (SDXL, only when
            a resolution was given to :meth:`Teacher.encode_prompt`; otherwise they are derived
            from the latent size in :meth:`Teacher.forward`), ``"timestep_cond"`` (LCM students).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def batch_size(self) -> int:
        """Number of prompts in the batch."""
        return len(self)

    @property
    def device(self) -> torch.device:
        """Device of the hidden states."""
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the hidden states."""
        return self.hidden.dtype

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(
            hidden=fn(self.hidden),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={k: fn(v) for k, v in self.extra.items()},
        )

    def cat(self, other: "PromptEmbeds") -> "PromptEmbeds":
        """Concatenate along the batch: ``self`` first, then ``other``.

        Raises:
            ValueError: when the two do not carry the same fields (e.g. one has ``pooled``).
        """
        if set(self.extra) != set(other.extra):
            raise ValueError(
                f"cannot concatenate PromptEmbeds with different extras {sorted(self.extra)} and "
                f"{sorted(other.extra)}; encode both with the same Teacher.encode_prompt call arguments"
            )
        if self.hidden.shape[1:] != other.hidden.shape[1:]:
            raise ValueError(
                f"cannot concatenate PromptEmbeds with hidden shapes {tuple(self.hidden.shape)} and "
                f"{tuple(other.hidden.shape)}; encode both with the same max_sequence_length"
            )
        return PromptEmbeds(
            hidden=torch.cat([self.hidden, other.hidden], dim=0),
            pooled=_cat_optional(self.pooled, other.pooled, "a pooled embedding"),
            extra={k: torch.cat([v, other.extra[k]], dim=0) for k, v in self.extra.items()},
        )

    @staticmethod
    def concat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate several embeddings along the batch, in order."""
        if not items:
            raise ValueError("PromptEmbeds.concat needs at least one item; pass a non-empty list")
        out = items[0]
        for item in items[1:]:
            out = out.cat(item)
        return out

    def repeat(self, n: int) -> "PromptEmbeds":
        """Repeat every prompt ``n`` times consecutively (``[a, b] -> [a, a, b, b]`` for n=2).

        This is diffusers' ``num_images_per_prompt`` layout; for a single prompt it is the same as
        tiling, e.g. ``teacher.encode_prompt([""]).repeat(B)`` gives a batch of ``B`` unconditional
        embeddings.
        """
        if n < 1:
            raise ValueError(f"repeat needs n >= 1, got {n}")
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def expand(self, batch: int) -> "PromptEmbeds":
        """Return a batch of ``batch`` entries: unchanged if already that size, tiled if of size 1.

        Raises:
            ValueError: if the size is neither 1 nor ``batch``.
        """
        if len(self) == batch:
            return self
        if len(self) == 1:
            return self.repeat(batch)
        raise ValueError(
            f"prompt embeddings hold {len(self)} prompts but the batch has {batch} samples; pass one prompt "
            f"per sample (or a single prompt to share)"
        )

    def index(self, idx: int | slice | Sequence[int] | torch.Tensor) -> "PromptEmbeds":
        """Select batch entries (an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.hidden.device)
        return self._map(lambda v: v[idx])

    __getitem__ = index

    def chunk(self, n: int) -> list["PromptEmbeds"]:
        """Split along the batch into ``n`` parts (like ``torch.chunk``)."""
        hidden = self.hidden.chunk(n, dim=0)
        pooled = self.pooled.chunk(n, dim=0) if self.pooled is not None else [None] * len(hidden)
        extra = {k: v.chunk(n, dim=0) for k, v in self.extra.items()}
        return [
            PromptEmbeds(hidden=h, pooled=p, extra={k: v[i] for k, v in extra.items()})
            for i, (h, p) in enumerate(zip(hidden, pooled))
        ]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        """Move to ``device``; ``dtype`` applies to floating-point tensors only (masks stay integer)."""

        def move(v: torch.Tensor) -> torch.Tensor:
            if dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)

        return self._map(move)

    def detach(self) -> "PromptEmbeds":
        """Detached copy (shares storage)."""
        return self._map(lambda v: v.detach())


# --------------------------------------------------------------------------- helpers


def drop_captions(embeds: PromptEmbeds, uncond: PromptEmbeds, drop: torch.Tensor) -> PromptEmbeds:
    """Rows where ``drop`` is true get the empty-prompt embedding ``uncond``."""
    u = uncond.to(embeds.device, embeds.dtype).expand(len(embeds))
    d = drop.to(embeds.device)

    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None:
            return None
        return torch.where(d.view(-1, *([1] * (a.ndim - 1))), b.to(a.dtype), a)

    return PromptEmbeds(hidden=pick(embeds.hidden, u.hidden), pooled=pick(embeds.pooled, u.pooled), extra=dict(embeds.extra))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux packing: ``[B, C, h, w] -> [B, (h/2)*(w/2), 4*C]`` (2x2 patches become tokens)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of size ``height x width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux position ids of the packed image tokens: ``[(h/2)*(w/2), 3]`` with (0, row, col)."""
    rows = torch.arange(height // 2, device=device).view(-1, 1).expand(height // 2, width // 2)
    cols = torch.arange(width // 2, device=device).view(1, -1).expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(-1, 3).to(dtype)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _nearest_multiples(value: int, multiple: int) -> tuple[int, int]:
    lower = (value // multiple) * multiple
    return (lower if lower > 0 else multiple), lower + multiple


# --------------------------------------------------------------------------- teacher


class Teacher(torch.nn.Module):
    """A frozen diffusers teacher (all parameters ``requires_grad=False``, always in eval mode).

    Build with :meth:`from_pretrained` (a local pipeline folder) or :meth:`from_pipeline`.

    Attributes:
        family: ``"sd"`` (SD1.x/2.x UNet and LCM), ``"sdxl"``, ``"flux"``, ``"sd3"`` or ``"pixart"``.
        kind: ``"unet"`` or ``"dit"``.
        schedule: the teacher's :class:`~fastgen.diffusion.NoiseSchedule` (from its scheduler config).
        vae_scale_factor: spatial downsampling of the VAE (8 for the released models).
        latent_channels: channels of the (unpacked) latents.
        resolution_multiple: image sizes must be multiples of this (VAE factor, times 2 for Flux
            packing or the DiT patch size).
        default_resolution: the pipeline's default image size in pixels.
        max_sequence_length: text length of the T5 encoders (Flux, SD3, PixArt); ``None`` otherwise.
        embedded_guidance: guidance fed to guidance-distilled Flux transformers when
            :meth:`forward` gets none.
        net: the denoiser (``unet`` or ``transformer``), shared with the pipeline.
        vae: the pipeline's VAE.
    """

    def __init__(self, pipe: Any, family: str | None = None, max_sequence_length: int | None = None) -> None:
        """Wrap a loaded pipeline; prefer :meth:`from_pretrained` / :meth:`from_pipeline`.

        Args:
            pipe: a diffusers pipeline of a supported class (see ``SUPPORTED_PIPELINES``).
            family: override of the family derived from the pipeline class.
            max_sequence_length: T5 text length; defaults to the stock pipeline's default.
        """
        super().__init__()
        pipe_class = type(pipe).__name__
        self.family: str = family or family_of(pipe_class)
        if self.family not in FAMILY_KIND:
            raise ValueError(f"unknown teacher family {self.family!r}; use one of {', '.join(FAMILY_KIND)}")
        self.kind: str = FAMILY_KIND[self.family]
        self.pipeline_class: str = pipe_class
        self._pipe = pipe
        #: how :meth:`predict` runs classifier-free guidance: ``batched`` (one forward of ``[uncond; cond]``,
        #: batch 2B) or ``separate`` (two forwards of batch B; the same result, a smaller activation peak)
        self.cfg_forward: str = "batched"

        net = pipe.unet if self.kind == "unet" else pipe.transformer
        self.net: torch.nn.Module = net
        self.vae: torch.nn.Module = pipe.vae
        encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        self.text_encoders = torch.nn.ModuleList([e for e in encoders if e is not None])

        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()

        self.schedule: NoiseSchedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels: int = int(self.vae.config.latent_channels)
        self.scaling_factor: float = float(self.vae.config.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor: float = float(self.vae.config.get("shift_factor", 0.0) or 0.0)

        patch = 1
        if self.family == "flux":
            patch = 2  # 2x2 latent packing
        elif self.kind == "dit":
            patch = int(getattr(net.config, "patch_size", 1) or 1)
        self.patch_factor: int = patch
        self.resolution_multiple: int = self.vae_scale_factor * patch

        sample_size = getattr(net.config, "sample_size", None)
        if self.family == "flux" or not sample_size:
            sample_size = getattr(pipe, "default_sample_size", None) or 128
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        self.default_resolution: int = int(sample_size) * self.vae_scale_factor

        if self.family in ("flux", "sd3"):
            default_len = DEFAULT_MAX_SEQUENCE_LENGTH[self.family]
        elif self.family == "pixart":
            default_len = DEFAULT_MAX_SEQUENCE_LENGTH[
                "pixart_sigma" if pipe_class == "PixArtSigmaPipeline" else "pixart_alpha"
            ]
        else:
            default_len = None
        self.max_sequence_length: int | None = (
            int(max_sequence_length) if (max_sequence_length is not None and default_len is not None) else default_len
        )
        self.guidance_embeds: bool = bool(getattr(net.config, "guidance_embeds", False))
        self.embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int | None = None,
    ) -> "Teacher":
        """Load a local diffusers pipeline folder (see :func:`fastgen.models.loading.load_pipeline`).

        Args:
            path: folder containing ``model_index.json`` (the output of ``pipe.save_pretrained``).
            device: where to put every component.
            dtype: dtype of every component.
            max_sequence_length: T5 text length for Flux/SD3/PixArt (stock default when ``None``).

        Raises:
            ModelLoadError: the folder is missing, incomplete or of an unsupported pipeline class.
        """
        pipe = load_pipeline(path, dtype=dtype)
        pipe.to(device)
        return cls(pipe, max_sequence_length=max_sequence_length)

    @classmethod
    def from_pipeline(cls, pipe: Any, max_sequence_length: int | None = None) -> "Teacher":
        """Wrap an already loaded pipeline (its components are frozen in place, not copied)."""
        if type(pipe).__name__ not in SUPPORTED_PIPELINES:
            family_of(type(pipe).__name__)  # raises ModelLoadError listing the supported classes
        return cls(pipe, max_sequence_length=max_sequence_length)

    def pipeline(self) -> Any:
        """The wrapped diffusers pipeline (components are shared with this teacher)."""
        return self._pipe

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher stays in eval mode whatever ``mode`` is (it is frozen)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters."""
        return _module_device(self.net)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser's parameters."""
        return _module_dtype(self.net)

    @property
    def prediction_type(self) -> str:
        """What the network predicts: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``."""
        return self.schedule.prediction_type

    # ------------------------------------------------------------------ resolution

    def check_resolution(self, height: int, width: int) -> None:
        """Raise :class:`~fastgen.errors.ResolutionError` unless both sizes are valid.

        Valid sizes are positive multiples of :attr:`resolution_multiple`; the message gives the
        nearest valid sizes.
        """
        m = self.resolution_multiple
        why = f"the VAE factor {self.vae_scale_factor}"
        if self.family == "flux":
            why += " x 2 for Flux's 2x2 latent packing"
        elif self.patch_factor > 1:
            why += f" x the transformer patch size {self.patch_factor}"
        problems: list[str] = []
        nearest: list[int] = []
        for name, value in (("height", height), ("width", width)):
            v = int(value)
            if v == value and v > 0 and v % m == 0:
                nearest.append(v)
                continue
            lo, hi = _nearest_multiples(max(v, 0), m)
            nearest.append(lo if abs(lo - value) <= abs(hi - value) else hi)
            choices = f"{lo} or {hi}" if lo < hi and lo != v else f"{hi}"
            problems.append(f"{name} {value} is not a positive multiple of {m} ({why}); nearest valid: {choices}")
        if problems:
            raise ResolutionError(
                f"image size {height}x{width} does not fit the {self.family} teacher: "
                + "; ".join(problems)
                + f". Use a size that is a multiple of {m}, e.g. {nearest[0]}x{nearest[1]}."
            )

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(B, C, h, w)`` of the (unpacked) latents of ``batch`` images of ``height x width`` pixels."""
        self.check_resolution(height, width)
        f = self.vae_scale_factor
        return (int(batch), self.latent_channels, int(height) // f, int(width) // f)

    # ------------------------------------------------------------------ text

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int) -> Any:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )

    def _clip_outputs(self, tokenizer: Any, encoder: torch.nn.Module, prompts: list[str], hidden_states: bool):
        ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length)
        device = _module_device(encoder)
        return encoder(ids.input_ids.to(device), output_hidden_states=hidden_states)

    def _t5_hidden(self, tokenizer: Any, encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
        ids = self._tokenize(tokenizer, prompts, int(self.max_sequence_length))
        return encoder(ids.input_ids.to(_module_device(encoder)))[0]

    @torch.no_grad()
    def encode_prompt(
        self, prompts: str | Sequence[str], height: int | None = None, width: int | None = None
    ) -> PromptEmbeds:
        """Encode prompts exactly as the stock pipeline does (no gradients).

        ``""`` gives the unconditional embedding of the stock pipeline's classifier-free guidance;
        for SDXL pipelines with ``force_zeros_for_empty_prompt`` that is all zeros (hidden and
        pooled), as in ``StableDiffusionXLPipeline``.

        Args:
            prompts: a prompt or a list of prompts.
            height, width: SDXL only: store micro-conditioning ``time_ids`` for this image size
                (original = target size, no crop). Without them :meth:`forward` derives the
                ``time_ids`` from the latent size, which is what the stock pipeline does.

        Returns:
            :class:`PromptEmbeds` on the teacher's device.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("encode_prompt got no prompts; pass a non-empty list of strings ('' for unconditional)")
        pipe = self._pipe
        device = self.device
        fam = self.family

        if fam == "sd":
            enc = pipe.text_encoder
            ids = self._tokenize(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
            mask = None
            if getattr(enc.config, "use_attention_mask", False):
                mask = ids.attention_mask.to(_module_device(enc))
            hidden = enc(ids.input_ids.to(_module_device(enc)), attention_mask=mask)[0]
            embeds = PromptEmbeds(hidden=hidden.to(device=device, dtype=_module_dtype(enc)))

        elif fam == "sdxl":
            pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
            pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
            hiddens, pooled = [], None
            for tok, enc in pairs:
                out = self._clip_outputs(tok, enc, prompts, hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]  # text_embeds of the projection model
                hiddens.append(out.hidden_states[-2].to(device))
            hidden = torch.cat(hiddens, dim=-1)
            if pooled is None:
                raise ValueError(
                    "this SDXL pipeline has no CLIPTextModelWithProjection text encoder, so there is no pooled "
                    "embedding; use a pipeline whose text_encoder_2 is CLIPTextModelWithProjection"
                )
            pooled = pooled.to(device)
            if pipe.config.get("force_zeros_for_empty_prompt", False):
                empty = torch.tensor([p == "" for p in prompts], device=device)
                if bool(empty.any()):
                    hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
                    pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            enc_dtype = _module_dtype(pipe.text_encoder_2) if pipe.text_encoder_2 is not None else self.dtype
            extra = {}
            if height is not None or width is not None:
                h = int(height if height is not None else width)
                w = int(width if width is not None else height)
                extra["time_ids"] = self._sdxl_time_ids(len(prompts), h, w, device, enc_dtype)
            embeds = PromptEmbeds(hidden=hidden.to(enc_dtype), pooled=pooled.to(enc_dtype), extra=extra)

        elif fam == "flux":
            clip = self._clip_outputs(pipe.tokenizer, pipe.text_encoder, prompts, hidden_states=False)
            pooled = clip.pooler_output.to(device=device, dtype=_module_dtype(pipe.text_encoder))
            hidden = self._t5_hidden(pipe.tokenizer_2, pipe.text_encoder_2, prompts)
            hidden = hidden.to(device=device, dtype=_module_dtype(pipe.text_encoder_2))
            txt_ids = torch.zeros(
                len(prompts), hidden.shape[1], 3, device=device, dtype=_module_dtype(pipe.text_encoder)
            )
            embeds = PromptEmbeds(hidden=hidden, pooled=pooled, extra={"txt_ids": txt_ids})

        elif fam == "sd3":
            clip_hidden, clip_pooled = [], []
            for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
                out = self._clip_outputs(tok, enc, prompts, hidden_states=True)
                clip_pooled.append(out[0].to(device))
                clip_hidden.append(out.hidden_states[-2].to(device=device, dtype=_module_dtype(pipe.text_encoder)))
            clip = torch.cat(clip_hidden, dim=-1)
            if pipe.text_encoder_3 is not None:
                t5 = self._t5_hidden(pipe.tokenizer_3, pipe.text_encoder_3, prompts)
                t5 = t5.to(device=device, dtype=_module_dtype(pipe.text_encoder_3))
            else:
                t5 = torch.zeros(
                    len(prompts),
                    int(self.max_sequence_length),
                    int(self.net.config.joint_attention_dim),
                    device=device,
                    dtype=_module_dtype(pipe.text_encoder),
                )
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = PromptEmbeds(hidden=torch.cat([clip, t5], dim=-2), pooled=torch.cat(clip_pooled, dim=-1))

        elif fam == "pixart":
            texts = [p.lower().strip() for p in prompts]  # the pipeline's clean_caption=False preprocessing
            tok = pipe.tokenizer(
                texts,
                padding="max_length",
                max_length=int(self.max_sequence_length),
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            enc = pipe.text_encoder
            mask = tok.attention_mask.to(_module_device(enc))
            hidden = enc(tok.input_ids.to(_module_device(enc)), attention_mask=mask)[0]
            embeds = PromptEmbeds(
                hidden=hidden.to(device=device, dtype=_module_dtype(enc)),
                extra={"attention_mask": mask.to(device)},
            )
        else:  # pragma: no cover - guarded in __init__
            raise ValueError(f"unknown family {fam!r}")
        return embeds

    @staticmethod
    def _sdxl_time_ids(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        row = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
        return row.unsqueeze(0).expand(batch, 6).clone()

    # ------------------------------------------------------------------ VAE

    def encode(
        self,
        pixels: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1, 1] ``[B, 3, H, W]`` -> scaled (and shifted) latents ``[B, C, h, w]``.

        ``latents = (z - shift_factor) * scaling_factor`` with ``z`` the mean of the VAE's latent
        distribution, or a sample from it with ``sample=True`` (using ``generator``).
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"encode expects pixels of shape [B, 3, H, W] in [-1, 1], got {tuple(pixels.shape)}; "
                f"add a batch dimension / convert to RGB first"
            )
        self.check_resolution(pixels.shape[-2], pixels.shape[-1])
        dist = self.vae.encode(pixels.to(device=_module_device(self.vae), dtype=_module_dtype(self.vae))).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        latents = (z - self.shift_factor) * self.scaling_factor
        return latents.to(pixels.dtype)

    @torch.no_grad()
    def encode_batch(self, batch: dict[str, Any], vae_sample: bool = False, what: str = "training") -> tuple[torch.Tensor, PromptEmbeds]:
        """``(latents [B, C, h, w] float32, embeddings)`` of a training batch: ``pixels`` (in [-1, 1]) or cached
        ``latents``, and ``caption`` strings or cached ``hidden`` (+ ``pooled``) embeddings."""
        device = self.device
        if "latents" in batch:
            latents = batch["latents"].to(device=device, dtype=torch.float32)
        elif "pixels" in batch:
            with torch.autocast(device_type=device.type, enabled=False):  # the VAE encodes in its own dtype
                latents = self.encode(batch["pixels"].to(device=device, dtype=torch.float32), sample=vae_sample).float()
            # contiguous like collated cached latents: the VAE's output may be channels_last, and randn_like(latents)
            # would then draw other noise than a cached run does for the same samples and seed
            latents = latents.contiguous()
        else:
            raise DataError(f"a {what} batch needs 'pixels' (images in [-1, 1]) or 'latents' (a cache); got {sorted(batch)}")
        if "hidden" in batch:
            embeds = PromptEmbeds(hidden=batch["hidden"].to(device), pooled=batch["pooled"].to(device) if "pooled" in batch else None)
        elif "caption" in batch:
            captions = batch["caption"]
            embeds = self.encode_prompt([captions] if isinstance(captions, str) else list(captions))
        else:
            raise DataError(f"a {what} batch needs 'caption' strings or cached 'hidden' embeddings; got {sorted(batch)}")
        if len(embeds) != latents.shape[0]:
            raise DataError(f"batch has {latents.shape[0]} images but {len(embeds)} captions; pass one caption per image")
        return latents, embeds

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> pixels ``[B, 3, H, W]`` in [-1, 1] (clamped unless ``clamp=False``).

        Gradients flow to ``latents`` (the VAE itself is frozen).
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects unpacked latents [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}"
                + ("; unpack Flux tokens with fastgen.models.teacher.unpack_latents first" if latents.ndim == 3 else "")
            )
        z = latents.to(device=_module_device(self.vae), dtype=_module_dtype(self.vae))
        z = z / self.scaling_factor + self.shift_factor
        image = self.vae.decode(z).sample
        if clamp:
            image = image.clamp(-1.0, 1.0)
        return image.to(latents.dtype)

    # ------------------------------------------------------------------ network

    def _timesteps(self, t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        t = t.reshape(-1)
        if t.shape[0] != batch:
            raise ValueError(
                f"got {t.shape[0]} timesteps for a batch of {batch}; pass one timestep per sample (shape [B]) "
                f"or a single scalar"
            )
        return t

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        embeds: PromptEmbeds,
        guidance_embed: float | torch.Tensor | None = None,
        net: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Raw network output for ``x_t`` at time ``t``, in the latent layout ``[B, C, h, w]``.

        Args:
            x_t: noisy latents ``[B, C, h, w]`` (unpacked for every family).
            t: the schedule's time, scalar or per-sample ``[B]``: integer timesteps (vp) or
                sigma in [0, 1] (flow).
            embeds: conditioning from :meth:`encode_prompt`, of batch ``B`` (or 1, shared).
            guidance_embed: guidance value for guidance-distilled Flux transformers
                (``guidance_embeds=True``); default ``embeds.extra["guidance"]`` or
                :attr:`embedded_guidance`. Ignored by other networks.
            net: another denoiser of the same family to run with these conventions (e.g. a student
                copy of :attr:`net`); default the teacher's own network. Runs on ``net``'s device
                and dtype, with gradients when ``net`` has them.

        Returns:
            The output in the teacher's prediction type (see :attr:`prediction_type`), with
            ``x_t``'s dtype. PixArt's learned-variance channels are dropped.
        """
        if x_t.ndim != 4:
            raise ValueError(f"forward expects latents [B, C, h, w], got shape {tuple(x_t.shape)}")
        b, _, h, w = x_t.shape
        if net is None:
            net = self.net
            device, dtype, guidance_embeds = self.device, self.dtype, self.guidance_embeds
        else:
            device, dtype = _module_device(net), _module_dtype(net)
            guidance_embeds = bool(getattr(getattr(net, "config", None), "guidance_embeds", False))
        embeds = embeds.expand(b).to(device=device, dtype=dtype)
        t = self._timesteps(t, b, device)
        x = x_t.to(device=device, dtype=dtype)
        fam = self.family

        if fam in ("sd", "sdxl"):
            added = None
            if fam == "sdxl":
                time_ids = embeds.extra.get("time_ids")
                if time_ids is None:
                    f = self.vae_scale_factor
                    time_ids = self._sdxl_time_ids(b, h * f, w * f, device, dtype)
                added = {"text_embeds": embeds.pooled, "time_ids": time_ids.to(dtype)}
            out = net(
                x,
                self.schedule.model_timestep(t),
                encoder_hidden_states=embeds.hidden,
                timestep_cond=embeds.extra.get("timestep_cond"),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

        elif fam == "flux":
            if h % 2 or w % 2:
                raise ResolutionError(
                    f"Flux latents must have even height and width for 2x2 packing, got {h}x{w}; use image sizes "
                    f"that are multiples of {self.resolution_multiple}"
                )
            guidance = None
            if guidance_embeds:
                g = guidance_embed
                if g is None:
                    g = embeds.extra.get("guidance", self.embedded_guidance)
                guidance = torch.as_tensor(g, device=device, dtype=torch.float32)
                guidance = guidance.expand(b) if guidance.ndim == 0 else guidance.reshape(b)
            txt_ids = embeds.extra.get("txt_ids")
            txt_ids = txt_ids[0] if txt_ids is not None else torch.zeros(embeds.hidden.shape[1], 3, device=device)
            grid_hint = hasattr(net, "token_grid")  # a CLEAR transformer: its token grid as static ints (torch.compile)
            if grid_hint:
                net.token_grid = (int(h) // 2, int(w) // 2)
            try:
                tokens = net(
                    hidden_states=pack_latents(x),
                    timestep=(self.schedule.model_timestep(t) / 1000.0).to(dtype),
                    guidance=guidance,
                    pooled_projections=embeds.pooled,
                    encoder_hidden_states=embeds.hidden,
                    txt_ids=txt_ids.to(dtype),
                    img_ids=latent_image_ids(h, w, device, dtype),
                    return_dict=False,
                )[0]
            finally:
                if grid_hint:
                    net.token_grid = None
            out = unpack_latents(tokens, h, w)

        elif fam == "sd3":
            out = net(
                hidden_states=x,
                timestep=self.schedule.model_timestep(t).to(dtype),
                encoder_hidden_states=embeds.hidden,
                pooled_projections=embeds.pooled,
                return_dict=False,
            )[0]

        elif fam == "pixart":
            added = {"resolution": None, "aspect_ratio": None}
            if getattr(net, "use_additional_conditions", False):
                f = self.vae_scale_factor
                added = {
                    "resolution": torch.tensor([h * f, w * f], device=device, dtype=dtype).expand(b, 2),
                    "aspect_ratio": torch.full((b, 1), float(h / w), device=device, dtype=dtype),
                }
            out = net(
                x,
                encoder_hidden_states=embeds.hidden,
                encoder_attention_mask=embeds.extra.get("attention_mask"),
                timestep=self.schedule.model_timestep(t),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            if out.shape[1] == 2 * self.latent_channels:
                out = out[:, : self.latent_channels]  # drop the learned-variance channels
        else:  # pragma: no cover
            raise ValueError(f"unknown family {fam!r}")
        return out.to(x_t.dtype)

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        cond: PromptEmbeds,
        uncond: PromptEmbeds | None = None,
        guidance: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` predicted by the teacher, with classifier-free guidance.

        With ``uncond`` given and ``guidance != 1``, runs ONE network call on the batch
        ``[uncond; cond]`` x ``[x_t; x_t]`` (or, with :attr:`cfg_forward` ``separate``, two calls of
        batch B) and combines ``out = u + w * (c - u)`` before converting to ``(x0, eps)`` with the
        schedule. ``guidance`` may be a float or per-sample ``[B]``.
        For a guidance-distilled Flux transformer without ``uncond``, ``guidance`` is fed to
        its guidance embedding instead.
        """
        b = x_t.shape[0]
        t = self._timesteps(t, b, x_t.device)
        use_cfg = uncond is not None and not (isinstance(guidance, (int, float)) and float(guidance) == 1.0)
        if use_cfg and self.cfg_forward == "separate":
            out = self.combine_guidance(self.forward(x_t, t, uncond.expand(b)), self.forward(x_t, t, cond.expand(b)), guidance)
        elif use_cfg:
            both = uncond.expand(b).cat(cond.expand(b))
            out = self.forward(torch.cat([x_t, x_t], dim=0), torch.cat([t, t], dim=0), both)
            out = self.combine_guidance(*out.chunk(2, dim=0), guidance)
        else:
            g = None
            if self.guidance_embeds and uncond is None:
                g = guidance
            out = self.forward(x_t, t, cond, guidance_embed=g)
        return self.output_to_x0_eps(out, x_t, t)

    @staticmethod
    def combine_guidance(out_u: torch.Tensor, out_c: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance ``u + w * (c - u)``; ``guidance`` a float or per-sample ``[B]``."""
        w = torch.as_tensor(guidance, device=out_c.device, dtype=out_c.dtype)
        if w.ndim == 1:
            w = w.view(-1, *([1] * (out_c.ndim - 1)))
        return out_u + w * (out_c - out_u)

    def output_to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a (guided) network output at ``t`` to ``(x0, eps)`` with the teacher's schedule (fp32 math)."""
        compute = torch.promote_types(x_t.dtype, torch.float32)
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha = alpha.to(device=x_t.device, dtype=compute)
        sigma = sigma.to(device=x_t.device, dtype=compute)
        x0, eps = to_x0_eps(out.to(compute), x_t.to(compute), alpha, sigma, self.prediction_type)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, pipeline={self.pipeline_class}, prediction_type={self.prediction_type}, "
            f"vae_scale_factor={self.vae_scale_factor}, latent_channels={self.latent_channels}"
        )


__all__ = [
    "DEFAULT_EMBEDDED_GUIDANCE",
    "FAMILY_KIND",
    "PromptEmbeds",
    "Teacher",
    "latent_image_ids",
    "pack_latents",
    "unpack_latents",
]
