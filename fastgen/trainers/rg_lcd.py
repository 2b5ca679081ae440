"""Reward-guided LCD (RG-LCD): LCD's loss plus ``-beta * reward`` of the student's one-step output.

One iteration, composing LCD's loss (:func:`fastgen.trainers.lcd.lcd_step`)::

    (L_LCD, zhat, z_target) = lcd_step(student, EMA target, teacher; z0, c)
    direct:  r = R(decode(zhat), prompt)          expert pixel reward, gradients through the VAE decoder
    lrm:     r = LRM(zhat, prompt)                latent proxy reward model, no decoding
    L_student = L_LCD - beta * mean(r)            (back-propagated into the student only)
    lrm mode, every lrm_update_every-th step, on lrm_batch_size rows:
        candidates {zhat, z_target, z0} decoded (no grad) and scored by the expert
        L_lrm = lrm_loss_scale * KL(expert's pairwise preferences || LRM's)   (into the LRM only)

Strong betas hack a direct expert: high-frequency patterns that raise the reward without better
images; the proxy is safer (not immune). Export is LCD's: a stock pipeline + ``LCMScheduler`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.losses import pairwise_preference_kl, reward_loss
from fastgen.rewards import load_reward
from fastgen.rewards.latent_proxy import LatentRewardModel, LRMPretrainConfig, pretrain_lrm
from fastgen.trainers.consistency import ConsistencyMethod
from fastgen.trainers.lcd import LCDConfig, lcd_step
from fastgen.trainers.method import StepOutput, register_method

__all__ = ["RGLCD", "RGLCDConfig"]


@dataclass
class RGLCDConfig(LCDConfig):
    """RG-LCD options (the ``rg_lcd:`` section): LCD's options (same names) plus

    Attributes:
        mode: ``"direct"`` (expert reward on decoded pixels) or ``"lrm"`` (latent proxy reward).
        reward: the expert reward model, a name (``digits``, ``hpsv2``, ``pickscore``, ``imagereward``,
            ``clip``) or a dict for :func:`fastgen.rewards.load_reward`.
        reward_scale: ``beta``.
        lrm_path: folder of a pre-trained LRM (``fastgen lrm pretrain``); with ``lrm_pretrain_if_missing``
            (digits world only) it is pre-trained there first when absent.
        lrm_pretrain: overrides of :class:`~fastgen.rewards.latent_proxy.LRMPretrainConfig`.
        lrm_update_every: the LRM steps every k-th student step (1 = RG-LCD's 1:1 ratio).
        lrm_batch_size: rows of the batch used for the alignment loss (RG-LCD: 16).
        lrm_loss_scale: multiplier of the alignment loss.
        smooth_gt_label: pairs with the real latent where the expert prefers the generated one get (0.5, 0.5).
    """

    section: ClassVar[str] = "rg_lcd"

    mode: Literal["direct", "lrm"] = "direct"
    reward: Any = "digits"
    reward_scale: float = 1.0
    lrm_path: str | None = None
    lrm_pretrain_if_missing: bool = True
    lrm_pretrain: dict = field(default_factory=dict)
    lrm_update_every: int = 1
    lrm_batch_size: int = 16
    lrm_loss_scale: float = 1.0
    smooth_gt_label: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("direct", "lrm"):
            raise ConfigError(f"rg_lcd.mode must be 'direct' or 'lrm', got {self.mode!r}")
        if self.reward_scale < 0:
            raise ConfigError(f"rg_lcd.reward_scale (beta) must be >= 0, got {self.reward_scale}")
        if self.mode == "lrm" and not self.lrm_path:
            raise ConfigError("rg_lcd.mode=lrm needs rg_lcd.lrm_path (a folder from `fastgen lrm pretrain`)")
        if self.lrm_update_every < 1:
            raise ConfigError(f"rg_lcd.lrm_update_every must be >= 1, got {self.lrm_update_every}")
        if self.lrm_batch_size < 1:
            raise ConfigError(f"rg_lcd.lrm_batch_size must be >= 1, got {self.lrm_batch_size}")


@register_method
class RGLCD(ConsistencyMethod):
    """Reward-guided LCD; see the module docstring for the algorithm."""

    name = "rg-lcd"
    config_class = RGLCDConfig
    label = "RG-LCD"

    def __init__(self, config: RGLCDConfig, **shared: Any):
        super().__init__(config, **shared)  # the teacher, student and EMA target (self.nets)
        self.reward_model = load_reward(config.reward)
        self.lrm: LatentRewardModel | None = None
        if config.mode == "lrm":
            self.lrm = self._load_lrm(config)
            self.lrm.train()

    def _load_lrm(self, cfg: RGLCDConfig) -> LatentRewardModel:
        path = Path(cfg.lrm_path)
        if not (path / "config.json").is_file():
            if not (cfg.lrm_pretrain_if_missing and self.is_digits_world()):
                raise ModelLoadError(
                    f"no latent reward model at {path} (config.json + model.safetensors); pre-train one with "
                    f"`fastgen lrm pretrain --teacher {self.nets.loaded.name} --data <image-caption folder or shards> "
                    f"--out {path}` (--data digits on the digits world), or set rg_lcd.lrm_path to an existing one"
                )
            pretrain_lrm(LRMPretrainConfig(**{"teacher": self.nets.loaded.name, "out": str(path), **cfg.lrm_pretrain}))
        lrm = LatentRewardModel.from_pretrained(path, trainable=True)
        t = self.nets.teacher
        lrm.check_compatible(t.latent_channels, self.nets.resolution // t.vae_scale_factor)
        return lrm

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = super().parameter_groups()
        if self.lrm is not None:
            groups["lrm"] = [p for p in self.lrm.parameters() if p.requires_grad]
        return groups

    def optimizers_to_step(self, step: int) -> list[str]:
        lrm_now = self.lrm is not None and step % self.config.lrm_update_every == 0
        return ["student", "lrm"] if lrm_now else ["student"]

    def decode_01(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0,1] (gradients reach the latents)."""
        return (self.nets.teacher.decode(latents) + 1.0) / 2.0

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        nets, cfg = self.nets, self.config
        captions = batch.get("caption")
        if captions is None:
            raise DataError("RG-LCD needs the captions as text for its reward model; the batch has none "
                            "(set data.latent_cache=false, or use a cache that keeps captions)")
        prompts = [captions] if isinstance(captions, str) else list(captions)
        latents, embeds = nets.encode_batch(batch, self.data_config.vae_sample)
        b = latents.shape[0]
        if len(prompts) != b:
            raise DataError(f"{len(prompts)} prompts for a batch of {b}: RG-LCD needs one prompt per image")
        # 1-2. LCD's loss, composed (caption dropout, teacher step, student vs EMA target): zhat = f_theta(x_s)
        out = lcd_step(nets, cfg, latents, embeds)
        pred = out["pred"]
        # 3. the reward of the one-step output: expert on pixels, or the latent proxy
        reward = self.reward_model(self.decode_01(pred), prompts) if cfg.mode == "direct" else self.lrm(pred, prompts)
        student_loss = out["loss"] + reward_loss(reward, cfg.reward_scale)
        losses = {"student": student_loss}
        logs = {"loss": float(student_loss.detach()), "lcd_loss": float(out["loss"].detach()),
                "reward": float(reward.detach().mean()), "w_mean": float(out["w"].mean())}
        # 4. lrm mode: align the proxy with the expert's preferences over {student, target, real}
        if "lrm" in self.optimizers_to_step(step):
            lrm_loss, agreement, expert_mean = self.alignment_loss(pred.detach(), out["target"].detach(), latents, prompts)
            losses["lrm"] = lrm_loss
            logs.update(lrm_loss=float(lrm_loss.detach()), lrm_agreement=float(agreement), expert_reward=float(expert_mean))
        return StepOutput(losses=losses, logs=logs)

    def alignment_loss(self, student: torch.Tensor, target: torch.Tensor, real: torch.Tensor, prompts: list[str]):
        """Pairwise KL between the expert's and the LRM's preferences over {student, target, real}."""
        k = min(self.config.lrm_batch_size, student.shape[0])
        rows = torch.randperm(student.shape[0])[:k]
        flat = torch.stack([student[rows], target[rows], real[rows]], dim=1).flatten(0, 1)  # [k*3, C, h, w]
        ps = [prompts[int(i)] for i in rows for _ in range(3)]
        with torch.no_grad():
            expert = self.reward_model(self.decode_01(flat.float()), ps).float() * self.reward_model.preference_scale()
        loss, agreement = pairwise_preference_kl(expert.view(k, 3), self.lrm.logits(flat, ps).view(k, 3), self.config.smooth_gt_label)
        return loss * self.config.lrm_loss_scale, agreement, expert.view(k, 3).mean()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state_dict()
        if self.lrm is not None:
            state.update({f"lrm.{k}": v for k, v in self.lrm.state_dict().items()})
        return state

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        lrm_state = {k[4:]: v for k, v in state.items() if k.startswith("lrm.")}
        super().load_checkpoint_state_dict({k: v for k, v in state.items() if not k.startswith("lrm.")})
        if self.lrm is not None:
            if not lrm_state:
                raise ModelLoadError("this checkpoint has no latent reward model (rg_lcd.mode=direct run?); resume it with rg_lcd.mode=direct")
            self.lrm.load_state_dict(lrm_state, strict=True)

    def export_name(self) -> str:
        return f"rg-lcd-{self.config.mode}"

    def export_extra(self) -> dict[str, Any]:
        cfg = self.config
        extra = {"method_title": "Reward-guided Latent Consistency Distillation", "reward": self.reward_model.describe(),
                 "reward_scale": cfg.reward_scale, "mode": cfg.mode}
        if self.lrm is not None:
            extra["lrm_path"] = str(cfg.lrm_path)
        return extra
