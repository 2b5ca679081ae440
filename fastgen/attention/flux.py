"""CLEAR attention inside diffusers' Flux transformer (``FluxAttention``, diffusers 0.42).

* :class:`ClearFluxAttnProcessor` is a drop-in processor for every ``FluxAttention`` of a
  ``FluxTransformer2DModel`` (double-stream and single-stream blocks). It reproduces the stock
  ``FluxAttnProcessor`` step for step (projections, QK RMSNorm, text (added) tokens *before*
  image tokens, RoPE on the joint sequence, output projections) and only replaces the attention
  call by :func:`~fastgen.attention.clear_attention`.
* :class:`RecordingFluxAttnProcessor` is the stock computation (full attention) with the option of
  keeping its attention output, for the attention-alignment loss against a CLEAR student.
* :func:`apply_clear` installs CLEAR processors on an existing transformer.
* :class:`ClearFluxTransformer2DModel` is a ``FluxTransformer2DModel`` whose config carries the
  CLEAR settings (``clear_radius``, ``clear_down_factor``, ``clear_backend``, ``clear_text_len``)
  and that installs CLEAR processors itself, so ``save_pretrained`` / ``from_pretrained`` (and a
  pipeline folder whose ``model_index.json`` lists ``["fastgen", "ClearFluxTransformer2DModel"]``)
  round-trip it, learnable pooling weights included.

**Where the token grid comes from.** Attention processors see token sequences, not images, and a
single-stream block does not even see where the text ends. The grid (``height x width`` image
tokens, raster order) and the text length are therefore published by the transformer's forward
in a context (:func:`clear_grid`): :class:`ClearFluxTransformer2DModel` reads them from
``img_ids`` (rows and columns of the packed latent tokens) and ``encoder_hidden_states``; a stock
transformer gets a forward hook from :func:`apply_clear` that does the same. A processor called
outside such a forward falls back to ``grid=(H, W)`` / ``text_len`` given at construction, then to a
square grid ``sqrt(num_image_tokens)``, and raises :class:`~fastgen.errors.ConfigError` when the
grid cannot be known.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import math
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (looked up by diffusers' pipeline loader)
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformer2DModel

from fastgen.errors import ConfigError

from .backends import BACKENDS, clear_attention
from .mask import normalize_radius, validate_clear_config

__all__ = [
    "ClearFluxAttnProcessor",
    "ClearFluxTransformer2DModel",
    "ClearGrid",
    "RecordingFluxAttnProcessor",
    "SUPPORTED_ATTENTION_CLASSES",
    "TRAINABLE_PATTERNS",
    "aligned_processor_names",
    "apply_clear",
    "clear_grid",
    "current_clear_grid",
    "flux_processor_names",
    "grid_from_img_ids",
    "is_trainable_name",
    "recording",
]

#: Attention module classes whose processors :func:`apply_clear` can replace.
SUPPORTED_ATTENTION_CLASSES: tuple[type, ...] = (FluxAttention,)


# ----------------------------------------------------------------------------------------------
# the grid context
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearGrid:
    """Image token grid (``height x width``, raster order) and number of leading text tokens."""

    height: int
    width: int
    text_len: int | None = None


_GRID: contextvars.ContextVar[ClearGrid | None] = contextvars.ContextVar("fastgen_clear_grid", default=None)


def current_clear_grid() -> ClearGrid | None:
    """The grid published by the innermost running :func:`clear_grid` (``None`` outside)."""
    return _GRID.get()


@contextlib.contextmanager
def clear_grid(height: int, width: int, text_len: int | None = None):
    """Publish the token grid (and text length) to the CLEAR processors called inside this block."""
    token = _GRID.set(ClearGrid(int(height), int(width), None if text_len is None else int(text_len)))
    try:
        yield
    finally:
        _GRID.reset(token)


def grid_from_img_ids(img_ids: torch.Tensor, num_image_tokens: int | None = None) -> tuple[int, int]:
    """``(height, width)`` of the image token grid from Flux position ids ``[L, 3]`` (``(0, row, col)``).

    The tokens must form a full raster-order grid (what ``FluxPipeline._prepare_latent_image_ids``
    builds): ``L = height * width`` with rows ``r0..r0+H-1`` and columns ``c0..c0+W-1``.

    Raises:
        ConfigError: the ids are not a ``[L, 3]`` (or ``[1, L, 3]``) tensor, or not a full raster grid.
    """
    ids = img_ids
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] < 3:
        raise ConfigError(
            f"CLEAR attention: img_ids must have shape [num_image_tokens, 3] (0, row, col), got {tuple(img_ids.shape)}"
        )
    n = int(ids.shape[0])
    if num_image_tokens is not None and n != int(num_image_tokens):
        raise ConfigError(
            f"CLEAR attention: img_ids describe {n} image tokens but hidden_states has {num_image_tokens}"
        )
    rows = ids[:, 1].round().long()
    cols = ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    if height * width != n:
        raise ConfigError(
            f"CLEAR attention: img_ids span a {height}x{width} grid but hold {n} tokens; CLEAR needs one token per "
            "grid cell in raster order (as FluxPipeline builds them). Extra image streams (e.g. reference images "
            "with their own ids) are not supported"
        )
    expected_rows = torch.arange(height, device=rows.device).repeat_interleave(width) + r0
    expected_cols = torch.arange(width, device=cols.device).repeat(height) + c0
    if not (torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)):
        raise ConfigError(
            "CLEAR attention: img_ids are not in raster order (row-major over the grid); CLEAR's window predicate "
            "assumes raster-ordered image tokens"
        )
    return height, width


# ----------------------------------------------------------------------------------------------
# processors
# ----------------------------------------------------------------------------------------------


def _projections(attn, hidden_states, encoder_hidden_states):
    """Q/K/V (and the text stream's), like diffusers' ``_get_qkv_projections`` (fused or not)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq = ek = ev = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, eq, ek, ev
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, eq, ek, ev


class _FluxJointAttnProcessor(torch.nn.Module):
    """The stock ``FluxAttnProcessor`` with a replaceable attention call (:meth:`attend`).

    ``record=True`` keeps the joint ``[text | image]`` attention output (heads flattened, before any
    output projection) in ``self.last_output``; the caller clears it (:meth:`pop_output`).
    """

    def __init__(self, record: bool = False):
        super().__init__()
        self.record = bool(record)
        self.last_output: torch.Tensor | None = None

    def attend(self, q, k, v, text_len, grid=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def pop_output(self) -> torch.Tensor | None:
        """The recorded attention output of the last call (then forgotten)."""
        out, self.last_output = self.last_output, None
        return out

    def __deepcopy__(self, memo):
        # a recorded output may be a non-leaf tensor (part of an autograd graph): never copy it
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        state = {k: (None if k == "last_output" else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()}
        new.__dict__.update(state)
        return new

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        clear_grid: ClearGrid | None = None,
    ):
        if attention_mask is not None:
            raise ConfigError(
                f"{type(self).__name__} does not take an attention_mask (the CLEAR pattern is the mask); "
                "Flux pipelines pass none"
            )
        query, key, value, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        text_len = None
        if attn.added_kv_proj_dim is not None:
            eq = eq.unflatten(-1, (-1, attn.head_dim))
            ek = ek.unflatten(-1, (-1, attn.head_dim))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            eq = attn.norm_added_q(eq)
            ek = attn.norm_added_k(ek)
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
            text_len = int(encoder_hidden_states.shape[1])

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # [B, N, heads, D] -> [B, heads, N, D] for the kernel, back afterwards
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len, clear_grid)
        hidden = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if self.record:
            self.last_output = hidden

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            encoder_out, hidden = hidden.split_with_sizes([n_text, hidden.shape[1] - n_text], dim=1)
            hidden = attn.to_out[0](hidden.contiguous())
            hidden = attn.to_out[1](hidden)
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return hidden, encoder_out
        return hidden


class RecordingFluxAttnProcessor(_FluxJointAttnProcessor):
    """The stock Flux attention (full softmax attention, ``F.scaled_dot_product_attention``) that can
    record its output (``record=True`` -> ``last_output``). Used for the teacher of CLEAR distillation."""

    def attend(self, q, k, v, text_len, grid=None):
        return F.scaled_dot_product_attention(q, k, v)


class ClearFluxAttnProcessor(_FluxJointAttnProcessor):
    """CLEAR local attention for a diffusers ``FluxAttention`` (double- and single-stream blocks).

    Args:
        radius: window radius ``r`` in tokens (image keys with ``dy^2 + dx^2 < r^2``).
        down_factor: ``f >= 2`` adds ``(H/f)*(W/f)`` pooled image KV tokens with a learnable ``f x f``
            ``spatial_weight`` (initialised to ``1/f^2``, i.e. average pooling).
        backend: ``"reference" | "flex" | "triton" | "auto"`` (see :func:`~fastgen.attention.clear_attention`).
        text_len: text length for calls without a grid context in single-stream blocks (double-stream
            blocks know it from ``encoder_hidden_states``).
        grid: ``(height, width)`` for calls without a grid context (default: square inference).
        record: keep the attention output (before output projections) in ``last_output``.
        kernel_kwargs: extra keyword arguments of :func:`~fastgen.attention.clear_attention`
            (``permute``, ``tile``, ``compiled``, ``block_size``, ...).
    """

    def __init__(
        self,
        radius: int | float,
        down_factor: int = 1,
        backend: str = "auto",
        text_len: int | None = None,
        grid: tuple[int, int] | None = None,
        record: bool = False,
        **kernel_kwargs: Any,
    ):
        super().__init__(record=record)
        self.radius = _check_settings(radius, down_factor, backend)
        self.down_factor = int(down_factor)
        self.backend = str(backend)
        self.text_len = None if text_len is None else int(text_len)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.kernel_kwargs = dict(kernel_kwargs)
        f = self.down_factor
        if f >= 2:
            self.spatial_weight = torch.nn.Parameter(torch.full((f, f), 1.0 / (f * f)))
        else:
            self.register_parameter("spatial_weight", None)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, down_factor={self.down_factor}, backend={self.backend!r}"

    def resolve_grid(self, num_tokens: int, text_len: int | None, grid: ClearGrid | None = None) -> tuple[int, int, int]:
        """``(height, width, text_len)`` of a joint sequence of ``num_tokens`` tokens: from ``grid`` (what
        :class:`ClearFluxTransformer2DModel` passes each processor), else the published grid, else the
        processor's own ``grid`` / ``text_len``, else a square."""
        ctx = grid if grid is not None else current_clear_grid()
        if text_len is None:
            text_len = ctx.text_len if ctx is not None and ctx.text_len is not None else self.text_len
        if text_len is None:
            raise ConfigError(
                "CLEAR attention: this single-stream block got the joint [text | image] sequence without its text "
                "length; call it through ClearFluxTransformer2DModel or a transformer prepared with apply_clear "
                "(they publish the grid from img_ids), or give the processor text_len=..."
            )
        n_img = int(num_tokens) - int(text_len)
        if ctx is not None:
            if ctx.height * ctx.width != n_img:
                raise ConfigError(
                    f"CLEAR attention: the transformer's grid {ctx.height}x{ctx.width} does not match the "
                    f"{n_img} image tokens of this attention call ({num_tokens} tokens - {text_len} text tokens)"
                )
            return ctx.height, ctx.width, int(text_len)
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n_img:
                raise ConfigError(
                    f"CLEAR attention: the processor's grid {self.grid[0]}x{self.grid[1]} does not match the "
                    f"{n_img} image tokens of this attention call"
                )
            return self.grid[0], self.grid[1], int(text_len)
        side = math.isqrt(max(n_img, 0))
        if n_img <= 0 or side * side != n_img:
            raise ConfigError(
                f"CLEAR attention: cannot infer the token grid of {n_img} image tokens (not a square); run the "
                "transformer's forward (it reads the grid from img_ids) or pass grid=(height, width)"
            )
        return side, side, int(text_len)

    def attend(self, q, k, v, text_len, grid=None):
        height, width, text_len = self.resolve_grid(q.shape[2], text_len, grid)
        return clear_attention(
            q, k, v,
            height=height, width=width, text_len=text_len, radius=self.radius, down_factor=self.down_factor,
            spatial_weight=self.spatial_weight, backend=self.backend, **self.kernel_kwargs,
        )


def _check_settings(radius, down_factor, backend) -> int | float:
    """Grid-independent checks (the radius against the grid is checked when attention runs); returns the
    radius as :func:`~fastgen.attention.mask.normalize_radius`."""
    if backend not in BACKENDS:
        raise ConfigError(f"CLEAR attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    radius = normalize_radius(radius)
    if isinstance(down_factor, bool) or not isinstance(down_factor, int) or down_factor < 1:
        raise ConfigError(f"CLEAR attention: down_factor must be an integer >= 1, got {down_factor!r}")
    return radius


# ----------------------------------------------------------------------------------------------
# installing processors
# ----------------------------------------------------------------------------------------------


def _supported_names() -> str:
    return ", ".join(c.__name__ for c in SUPPORTED_ATTENTION_CLASSES) + " (in FluxTransformer2DModel / ClearFluxTransformer2DModel)"


def flux_processor_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the attention processors of ``transformer`` in diffusers' order (double blocks first).

    Raises:
        ConfigError: the model has no supported (``FluxAttention``) attention modules, or mixes them
            with other attention classes.
    """
    if not hasattr(transformer, "attn_processors"):
        raise ConfigError(
            f"CLEAR attention: {type(transformer).__name__} has no diffusers attention processors; supported "
            f"attention blocks: {_supported_names()}"
        )
    names = list(transformer.attn_processors)
    modules = {f"{n}.processor": m for n, m in transformer.named_modules() if hasattr(m, "set_processor")}
    kinds = {n: type(modules[n]).__name__ if n in modules else "?" for n in names}
    unsupported = sorted({k for n, k in kinds.items() if not isinstance(modules.get(n), SUPPORTED_ATTENTION_CLASSES)})
    if not names or unsupported:
        found = ", ".join(unsupported) if unsupported else "none"
        raise ConfigError(
            f"CLEAR attention does not support {type(transformer).__name__}: its attention blocks are {found}; "
            f"supported attention blocks: {_supported_names()}"
        )
    return names


def _install_grid_hooks(transformer: torch.nn.Module) -> None:
    """Forward hooks that publish the grid of a stock Flux transformer's forward (from ``img_ids``)."""
    for handle in getattr(transformer, "_clear_grid_hooks", ()):
        handle.remove()
    signature = inspect.signature(transformer.forward)
    tokens: list[contextvars.Token] = []

    def pre_hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        img_ids, hidden, enc = bound.get("img_ids"), bound.get("hidden_states"), bound.get("encoder_hidden_states")
        if img_ids is None or hidden is None:
            tokens.append(None)
            return None
        h, w = grid_from_img_ids(img_ids, hidden.shape[1])
        text_len = None if enc is None else int(enc.shape[1])
        tokens.append(_GRID.set(ClearGrid(h, w, text_len)))
        return None

    def post_hook(module, args, kwargs, output):
        if tokens:
            token = tokens.pop()
            if token is not None:
                _GRID.reset(token)
        return None

    handles = [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]
    object.__setattr__(transformer, "_clear_grid_hooks", handles)


def apply_clear(
    transformer: torch.nn.Module,
    radius: int | float,
    down_factor: int = 1,
    backend: str = "auto",
    *,
    text_len: int | None = None,
    grid: tuple[int, int] | None = None,
    **kernel_kwargs: Any,
) -> list[str]:
    """Replace every attention processor of a Flux transformer by a :class:`ClearFluxAttnProcessor`.

    Works on a stock ``FluxTransformer2DModel`` (a forward hook then publishes the grid from
    ``img_ids``) and on :class:`ClearFluxTransformer2DModel` (its forward does it). The radius is
    checked against the grid when attention runs (``ConfigError`` from ``validate_clear_config``)
    and now when ``grid=(height, width)`` is given.

    Returns the processor names (diffusers' order: double-stream blocks first).

    Raises:
        ConfigError: the model has no supported attention blocks (e.g. a UNet), a bad radius /
            down_factor / backend, or a radius that does not fit ``grid``.
    """
    names = flux_processor_names(transformer)
    _check_settings(radius, down_factor, backend)
    if grid is not None:
        validate_clear_config(grid[0], grid[1], text_len or 0, radius, down_factor)
    try:
        ref = next(transformer.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:  # pragma: no cover - a transformer always has parameters
        device, dtype = torch.device("cpu"), torch.float32
    processors = {}
    for name in names:
        proc = ClearFluxAttnProcessor(radius, down_factor, backend, text_len=text_len, grid=grid, **kernel_kwargs)
        if device.type != "meta" and dtype.is_floating_point:
            proc.to(device=device, dtype=dtype)
        elif device.type != "meta":
            proc.to(device=device)
        processors[name] = proc
    transformer.set_attn_processor(processors)
    if not isinstance(transformer, ClearFluxTransformer2DModel):
        _install_grid_hooks(transformer)
    return names


# ----------------------------------------------------------------------------------------------
# the exported model class
# ----------------------------------------------------------------------------------------------


class ClearFluxTransformer2DModel(FluxTransformer2DModel):
    """``FluxTransformer2DModel`` with CLEAR attention in every block (config-driven, saveable).

    Extra config entries: ``clear_radius`` (window radius in tokens), ``clear_down_factor`` (pooled
    KV factor; ``>= 2`` adds learnable ``spatial_weight`` tensors, stored as
    ``...attn.processor.spatial_weight``), ``clear_backend`` (``"auto"``: on CPU the reference kernel for training and the
    measured-fastest exact kernel for inference, triton for inference / flex for training on CUDA), ``clear_text_len`` (only for processor calls
    outside :meth:`forward`). The forward reads the token grid from ``img_ids``.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        clear_radius: int | float = 16,
        clear_down_factor: int = 1,
        clear_backend: str = "auto",
        clear_text_len: int | None = None,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        apply_clear(self, clear_radius, clear_down_factor, clear_backend, text_len=clear_text_len)

    @classmethod
    def from_flux(
        cls,
        transformer: FluxTransformer2DModel,
        radius: int | float,
        down_factor: int = 1,
        backend: str = "auto",
        text_len: int | None = None,
    ) -> "ClearFluxTransformer2DModel":
        """A CLEAR copy of a (stock) Flux transformer: same config and weights, CLEAR processors
        (``spatial_weight`` initialised to average pooling)."""
        config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_") and not k.startswith("clear_")}
        model = cls.from_config(
            config, clear_radius=radius, clear_down_factor=down_factor, clear_backend=backend, clear_text_len=text_len
        )
        state = transformer.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("spatial_weight")]
        if missing or unexpected:
            raise ConfigError(
                f"cannot copy {type(transformer).__name__} into ClearFluxTransformer2DModel: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        ref = next(transformer.parameters())
        if ref.dtype != torch.float32 or ref.device.type != "cpu":
            model = model.to(device=ref.device, dtype=ref.dtype)
        return model

    def set_clear_backend(self, backend: str) -> None:
        """Switch the attention backend of every CLEAR processor (and the saved config)."""
        if backend not in BACKENDS:
            raise ConfigError(f"CLEAR attention: unknown backend {backend!r}; choose one of {BACKENDS}")
        for proc in self.attn_processors.values():
            if isinstance(proc, ClearFluxAttnProcessor):
                proc.backend = backend
        self.register_to_config(clear_backend=backend)

    #: The packed latent grid ``(height, width)`` of the current call, read by a forward under ``torch.compile``
    #: (see :meth:`forward`); ``None``: read from ``img_ids``. Eager forwards always read ``img_ids``.
    token_grid: tuple[int, int] | None = None

    def _all_clear_processors(self) -> bool:
        return all(isinstance(p, _FluxJointAttnProcessor) for p in self.attn_processors.values())

    def clear_processors(self) -> dict[str, ClearFluxAttnProcessor]:
        """Processor name -> CLEAR processor (diffusers' order, double-stream blocks first)."""
        return {n: p for n, p in self.attn_processors.items() if isinstance(p, ClearFluxAttnProcessor)}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ):
        """``FluxTransformer2DModel.forward`` with the token grid read from ``img_ids`` and published to the CLEAR
        processors (compiled: handed to each as its ``clear_grid`` keyword).

        Under ``torch.compile`` the values of ``img_ids`` cannot be read without breaking the graph: when
        :attr:`token_grid` holds the grid of these tokens (fastgen's teacher wrapper sets it around each of
        its calls), the compiled forward uses it; otherwise it reads ``img_ids`` (a graph break, still correct)."""
        if img_ids is None:
            raise ConfigError("ClearFluxTransformer2DModel needs img_ids (the image token positions) to find the grid")
        n = hidden_states.shape[1]
        grid_hint = self.token_grid
        if torch.compiler.is_compiling() and grid_hint is not None and grid_hint[0] * grid_hint[1] == n:
            height, width = grid_hint
        else:
            height, width = grid_from_img_ids(img_ids, n)
        text_len = None if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])
        if torch.compiler.is_compiling():  # no context variable in a graph: each processor gets the grid as a keyword
            if self._all_clear_processors():
                joint_attention_kwargs = {**(joint_attention_kwargs or {}), "clear_grid": ClearGrid(int(height), int(width), text_len)}
            context = contextlib.nullcontext()
        else:
            context = clear_grid(height, width, text_len)
        with context:
            return super().forward(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples,
                return_dict=return_dict,
                controlnet_blocks_repeat=controlnet_blocks_repeat,
            )


# --------------------------------------------------------------------------- distilling into CLEAR

#: Parameter-name fragments of the tensors a CLEAR student trains (image-stream attention projections,
#: pooling weights); everything else of the transformer stays the teacher's.
TRAINABLE_PATTERNS: tuple[str, ...] = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", "spatial_weight")


def is_trainable_name(name: str) -> bool:
    """Whether a CLEAR student parameter trains (image-stream attention projections, pooling weights)."""
    return any(p in name for p in TRAINABLE_PATTERNS)


def aligned_processor_names(names: list[str], every: int) -> list[str]:
    """Single-stream processors whose index in ``names`` (double blocks first) is divisible by ``every``
    (CLEAR aligns every 4th: single blocks 1, 5, ..., 37 of FLUX.1-dev)."""
    if every <= 0:
        return []
    return [n for i, n in enumerate(names) if i % every == 0 and n.startswith("single_transformer_blocks.")]


@contextlib.contextmanager
def recording(processors: list) -> Iterator[None]:
    """Record the attention outputs of ``processors`` (RecordingFluxAttnProcessor / ClearFluxAttnProcessor)
    inside this block; nothing stays recorded afterwards."""
    for p in processors:
        p.record, p.last_output = True, None
    try:
        yield
    finally:
        for p in processors:
            p.record, p.last_output = False, None
