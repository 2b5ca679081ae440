"""CLEAR: distil a Flux DiT teacher into a student with local (circular-window) attention.

The student is a copy of the teacher transformer as
:class:`~fastgen.attention.flux.ClearFluxTransformer2DModel`: every attention block uses the CLEAR
pattern (text rows/columns full, image queries see the image keys with ``dy^2 + dx^2 < r^2``,
optionally pooled KV). Only the image-stream attention projections train (``to_q``, ``to_k``,
``to_v``, ``to_out`` and, with ``down_factor >= 2``, the pooling ``spatial_weight``).

Data: latents the teacher sampled itself from the training prompts (``data.source: teacher-samples``,
built once, :mod:`fastgen.data.teacher_samples`). One iteration::

    u ~ U(0, 1];  sigma = schedule.training_sigma(u)   (CLEAR's timesteps[int(u * 1000)]: the static
                                                         shift of the scheduler, unshifted when it shifts
                                                         by resolution, as FLUX.1-dev's)
    x_t = (1 - sigma) x0 + sigma eps
    v_T, A_T = teacher(x_t, sigma, c)      (no grad, full attention, aligned attention outputs recorded)
    v_S, A_S = student(x_t, sigma, c)      (CLEAR attention)
    L = fm_weight mse(v_S, eps - x0) + kd_weight mse(v_S, v_T) + attn_weight mean_l mse(A_S, A_T)   (1, 0.5, 0.5)

Aligned layers: single-stream blocks whose index among all attention processors (double blocks
first) is divisible by ``align_every`` (4 in CLEAR). Guidance-distilled teachers (FLUX.1-dev) see
the embedded guidance (3.5 by default); other Flux teachers sample with true CFG against the empty
prompt, so the student also trains on the empty prompt with probability ``caption_dropout``.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import FluxPipeline

from fastgen.attention import normalize_radius, validate_clear_config, window_info
from fastgen.attention.flux import TRAINABLE_PATTERNS, ClearFluxTransformer2DModel, RecordingFluxAttnProcessor
from fastgen.attention.flux import aligned_processor_names, is_trainable_name, recording
from fastgen.data.sources import build_dataset
from fastgen.data.teacher_samples import generate_with_pipeline
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.losses import attention_alignment_loss, flow_matching_loss, output_distillation_loss
from fastgen.models import PromptEmbeds
from fastgen.models.spec import load_teacher, lower_precision
from fastgen.models.teacher import DEFAULT_EMBEDDED_GUIDANCE, unpack_latents
from fastgen.pipelines.cards import clear_card
from fastgen.pipelines.writer import ExportPlan, build_pipeline
from fastgen.trainers.method import Method, StepOutput, register_method
from fastgen.zoo import paths as zoo_paths

__all__ = ["Clear", "ClearConfig", "TRAINABLE_PATTERNS", "aligned_processor_names", "is_trainable_name"]

@dataclass
class ClearConfig:
    """CLEAR's algorithm options (the ``clear:`` section).

    Attributes:
        radius: window radius ``r`` in latent tokens (image keys with ``dy^2 + dx^2 < r^2``); a real
            number >= 1, so windows between integer radii are reachable (2 / 2.2 / 3: 9 / 13 / 25 keys).
        down_factor: ``f >= 2`` adds ``(H/f)*(W/f)`` pooled KV tokens with learnable ``f x f`` weights.
        backend: attention backend while training (``reference`` on CPU: the only one with a CPU
            backward; ``flex`` on CUDA).
        caption_dropout: probability of training a row on the empty prompt (true-CFG teachers).
        fm_weight, kd_weight, attn_weight: loss weights (1, 0.5, 0.5 in CLEAR).
        align_every: attention alignment on single-stream blocks whose processor index is divisible by
            this; 0 turns alignment off.
    """

    radius: int | float = 4
    down_factor: int = 1
    backend: Literal["reference", "flex", "triton", "auto"] = "reference"
    caption_dropout: float = 0.1
    fm_weight: float = 1.0
    kd_weight: float = 0.5
    attn_weight: float = 0.5
    align_every: int = 4

    def __post_init__(self) -> None:
        try:
            self.radius = normalize_radius(self.radius)
        except ConfigError:
            raise ConfigError(f"clear.radius must be a number >= 1 (tokens), got {self.radius!r}; CLEAR uses 8/16/32") from None
        if self.down_factor < 1:
            raise ConfigError(f"clear.down_factor must be >= 1, got {self.down_factor}; use 1 (no pooled KV) or e.g. 4")
        for name in ("fm_weight", "kd_weight", "attn_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"clear.{name} must be >= 0, got {getattr(self, name)}")
        if self.fm_weight + self.kd_weight + self.attn_weight <= 0:
            raise ConfigError("clear.fm_weight, kd_weight and attn_weight are all 0: nothing to train")
        if self.align_every < 0:
            raise ConfigError(f"clear.align_every must be >= 0 (0 = no attention alignment), got {self.align_every}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"clear.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@register_method
class Clear(Method):
    """CLEAR attention distillation; see the module docstring for the algorithm."""

    name = "clear"
    config_class = ClearConfig
    default_teacher = "digits-flux"
    default_sample_steps = 50
    default_eval_samples = 500
    default_data_source = "teacher-samples"
    #: the old ``clear.seed`` seeded both the teacher samples and the evaluation
    legacy_keys = {"seed": ("data.seed", "sample.seed")}

    def __init__(self, config: ClearConfig, **shared: Any):
        super().__init__(config, **shared)
        cfg = config
        self.loaded = loaded = load_teacher(self.teacher_config, self.default_teacher, ("flux",), "CLEAR")
        self.teacher = teacher = loaded.teacher
        self.resolution, self.max_sequence_length = loaded.resolution, int(teacher.max_sequence_length)
        f = teacher.vae_scale_factor * 2  # VAE factor x 2x2 packing
        self.grid = (self.resolution // f, self.resolution // f)
        validate_clear_config(self.grid[0], self.grid[1], self.max_sequence_length, cfg.radius, cfg.down_factor)
        student = ClearFluxTransformer2DModel.from_flux(teacher.net, radius=cfg.radius, down_factor=int(cfg.down_factor), backend=cfg.backend)
        student.requires_grad_(False)
        for n, p in student.named_parameters():
            p.requires_grad_(is_trainable_name(n))
        self.student = student.train()
        names = list(student.attn_processors)
        self.aligned = aligned_processor_names(names, cfg.align_every) if cfg.attn_weight > 0 else []
        if cfg.attn_weight > 0 and not self.aligned:
            warnings.warn(f"clear.align_every={cfg.align_every} selects no single-stream block among the {len(names)} attention "
                          "processors of this teacher, so L_attn is 0; lower align_every (e.g. 2) to align some blocks")
        if self.aligned:
            teacher.net.set_attn_processor({**teacher.net.attn_processors, **{n: RecordingFluxAttnProcessor() for n in self.aligned}})
        lower_precision(teacher, loaded.low_dtype)
        self._embed_cache: dict[tuple[str, str], PromptEmbeds] = {}

    # ------------------------------------------------------------------ guidance and pipeline calls
    def is_digits_world(self) -> bool:
        return self.loaded.digits

    @property
    def guidance_mode(self) -> str:
        """``"embedded"`` (guidance-distilled transformer) or ``"true_cfg"`` (CFG against the empty prompt)."""
        return "embedded" if self.teacher.guidance_embeds else "true_cfg"

    @property
    def guidance(self) -> float:
        """Guidance of the teacher's data and the student's samples: ``sample.guidance_scale``, else the
        teacher's default (the digits DiT's true CFG scale, embedded 3.5 when guidance-distilled, else 1)."""
        if self.sample_config.guidance_scale is not None:
            return float(self.sample_config.guidance_scale)
        if self.guidance_mode == "embedded":
            return float(DEFAULT_EMBEDDED_GUIDANCE)
        return float(zoo_paths.DIT_GUIDANCE) if self.is_digits_world() else 1.0

    def pipeline_kwargs(self, batch: int, guidance: float | None = None) -> dict[str, Any]:
        """Keyword arguments of ``FluxPipeline.__call__`` that reproduce this run's sampling setup."""
        g = self.guidance if guidance is None else float(guidance)
        kw: dict[str, Any] = {"height": self.resolution, "width": self.resolution, "max_sequence_length": self.max_sequence_length}
        if self.guidance_mode == "embedded":
            kw["guidance_scale"] = g
        else:
            kw["guidance_scale"] = 1.0  # ignored by a transformer without guidance embedding
            if g > 1.0:
                kw.update(true_cfg_scale=g, negative_prompt=[""] * batch)
        return kw

    def student_pipeline(self, transformer: torch.nn.Module | None = None) -> FluxPipeline:
        """The teacher's ``FluxPipeline`` components with the student transformer and a fresh scheduler."""
        sched = self.teacher.pipeline().scheduler
        pipe = build_pipeline(self.teacher.pipeline(), {"transformer": transformer or self.student, "scheduler": type(sched).from_config(sched.config)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ what trains
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.student.named_parameters() if p.requires_grad]

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The teacher-generated latents (built once, then read from the cache)."""
        h = self.resolution // self.teacher.vae_scale_factor
        if self.data_config.source == "teacher-samples" and not self.data_config.prompts and not self.is_digits_world():
            raise ConfigError(f"teacher '{self.loaded.name}' is not the digits-world DiT: give data.prompts (a prompt file) "
                              "for the teacher-generated training data")

        def generate(prompts: list[str]) -> torch.Tensor:
            d = self.data_config
            return generate_with_pipeline(self.teacher.pipeline(), prompts, d.teacher_steps, d.teacher_batch_size, d.seed,
                                          self.pipeline_kwargs, lambda tokens: unpack_latents(tokens, h, h))

        return build_dataset(self.data_config, resolution=self.resolution, teacher_id=str(self.loaded.path.resolve()),
                             generate=generate, generation_key=(self.max_sequence_length, self.guidance_mode, self.guidance),
                             accepts=("teacher-samples", "cache"))

    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Teacher text embeddings of ``prompts`` (memoised per prompt, bounded)."""
        device = self.teacher.device
        missing = [p for p in dict.fromkeys(prompts) if (p, str(device)) not in self._embed_cache]
        if missing:
            embeds = self.teacher.encode_prompt(missing)
            for i, p in enumerate(missing):
                self._embed_cache[(p, str(device))] = embeds.index(i)
            for key in list(self._embed_cache)[: max(0, len(self._embed_cache) - 8192)]:
                del self._embed_cache[key]
        return PromptEmbeds.concat([self._embed_cache[(p, str(device))] for p in prompts])

    def compute_loss(self, latents: torch.Tensor, embeds: PromptEmbeds, sigma: torch.Tensor, noise: torch.Tensor) -> dict[str, Any]:
        """The CLEAR loss for explicit randomness (``sigma`` [B], ``noise`` like ``latents``)."""
        cfg, x0 = self.config, latents.float()
        s = sigma.to(device=x0.device, dtype=x0.dtype).view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise.to(x0)
        g = self.guidance if self.guidance_mode == "embedded" else None
        with recording([net.attn_processors[n] for net in (self.teacher.net, self.student) for n in self.aligned]):
            with torch.no_grad(), torch.autocast(device_type=x0.device.type, enabled=False):
                v_teacher = self.teacher.forward(x_t, sigma, embeds, guidance_embed=g).float()
            t_attn = [self.teacher.net.attn_processors[n].pop_output() for n in self.aligned]
            v_student = self.teacher.forward(x_t, sigma, embeds, guidance_embed=self.guidance, net=self.student).float()
            s_attn = [self.student.attn_processors[n].pop_output() for n in self.aligned]
        fm = flow_matching_loss(v_student, x0, noise)
        kd = output_distillation_loss(v_student, v_teacher)
        attn = attention_alignment_loss(s_attn, t_attn)
        attn = torch.zeros((), device=x0.device) if attn is None else attn
        loss = cfg.fm_weight * fm + cfg.kd_weight * kd + cfg.attn_weight * attn
        return {"loss": loss, "fm": fm, "kd": kd, "attn": attn, "v_student": v_student, "v_teacher": v_teacher, "x_t": x_t}

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        if "latents" not in batch or "caption" not in batch:
            raise DataError(f"a CLEAR batch needs 'latents' and 'caption' (teacher samples); got {sorted(batch)}")
        latents = batch["latents"].to(device=self.teacher.device, dtype=torch.float32)
        captions = [batch["caption"]] if isinstance(batch["caption"], str) else [str(c) for c in batch["caption"]]
        # 1. caption dropout -> the empty prompt (the unconditional branch of true CFG)
        if self.config.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.config.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        # 2. sigma from the scheduler's training distribution, fresh noise
        sigma = self.teacher.schedule.training_sigma(1.0 - torch.rand(len(captions))).to(latents.device)
        noise = torch.randn_like(latents)
        # 3. flow matching + output distillation + attention alignment
        out = self.compute_loss(latents, self.encode(captions), sigma, noise)
        return StepOutput(losses={"student": out["loss"]}, logs={
            "loss/fm": float(out["fm"].detach()), "loss/kd": float(out["kd"].detach()),
            "loss/attn": float(out["attn"].detach()), "sigma_mean": float(sigma.float().mean())})

    # ------------------------------------------------------------------ state
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (the rest is the teacher's), as ``student.<name>``."""
        return {f"student.{n}": p.detach() for n, p in self.student.named_parameters() if p.requires_grad}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        given = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        if missing or unexpected:
            raise ModelLoadError(f"the checkpoint does not fit this CLEAR student: {len(missing)} missing (e.g. {missing[:3]}), "
                                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); use the teacher / down_factor the run was trained with")
        with torch.no_grad():
            for n, p in own.items():
                if given[n].shape != p.shape:
                    raise ModelLoadError(f"checkpoint tensor '{n}' has shape {tuple(given[n].shape)}, expected {tuple(p.shape)}")
                p.copy_(given[n].to(p.dtype))

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator, guidance: float | None = None) -> torch.Tensor:
        """Images in [0, 1] from the student through the stock ``FluxPipeline`` (the export gives the same images)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.autocast(device_type=self.teacher.device.type, enabled=False):
                images = self.student_pipeline()(prompts, num_inference_steps=int(num_steps), generator=generator, output_type="pt",
                                                 **self.pipeline_kwargs(len(prompts), guidance)).images
        finally:
            self.student.train(was_training)
        return images.float().clamp(0.0, 1.0)

    def attention_info(self) -> dict[str, Any]:
        """Window size and attention-FLOP fractions of this run's CLEAR pattern at its resolution."""
        return window_info(*self.grid, self.max_sequence_length, self.config.radius, int(self.config.down_factor))

    def export_plan(self) -> ExportPlan:
        """The teacher's ``FluxPipeline`` folder with the student as ``ClearFluxTransformer2DModel``."""
        cfg, tdtype, backend = self.config, self.teacher.dtype, self.export_config.attention_backend
        model = copy.deepcopy(self.student).requires_grad_(False).eval().to(tdtype)
        model.set_clear_backend(backend)
        sched = self.teacher.pipeline().scheduler
        kw = self.pipeline_kwargs(1)
        info = {"method": "clear", "teacher": self.loaded.name, "teacher_path": os.fspath(Path(self.loaded.path).resolve()),
                "teacher_pipeline_class": self.teacher.pipeline_class, "pipeline_class": "FluxPipeline",
                "transformer_class": "ClearFluxTransformer2DModel", "model_index_entry": ["fastgen", "ClearFluxTransformer2DModel"],
                "radius": cfg.radius, "down_factor": int(cfg.down_factor), "attention_backend": backend,
                **self.attention_info(), "aligned_layers": list(self.aligned), "trainable_tensors": len(self.trainable_names()),
                "resolution": self.resolution, "num_inference_steps": self.sample_steps, "guidance_mode": self.guidance_mode,
                "guidance_scale": float(kw["guidance_scale"]), "true_cfg_scale": float(kw.get("true_cfg_scale", 1.0)),
                "negative_prompt": "" if "negative_prompt" in kw else None, "max_sequence_length": self.max_sequence_length,
                "scheduler": type(sched).__name__, "transformer_dtype": str(tdtype).replace("torch.", ""), "config": asdict(cfg)}
        return ExportPlan(kind="pipeline", base=self.teacher.pipeline(),
                          replace={"transformer": model, "scheduler": type(sched).from_config(sched.config)},
                          model_index={"transformer": ["fastgen", "ClearFluxTransformer2DModel"]}, info=info, card=clear_card)
