"""Reward-guided LCD (RG-LCD): the LCD loss plus ``-beta * reward`` of the student's one-step output.

Let ``zhat = f_theta(x_{t_start}, w, c, t_start)`` be the student's consistency output on a noised
*real* latent (the ``pred`` of :meth:`LCD.compute_loss`). Two modes:

* ``direct``: ``x_hat = decode(zhat)`` in [0,1] (gradients through the VAE decoder) and
  ``L = L_LCD - beta * mean R(x_hat, prompt)`` with an expert pixel reward model ``R``. Strong
  betas hack ``R``: high-frequency patterns that raise the reward without better images.
* ``lrm``: ``L = L_LCD - beta * mean LRM(zhat, prompt)``, a latent proxy reward model
  (:mod:`fastgen.rewards.latent_proxy`) that reads latents directly. The LRM is its own optimizer
  group (``train.learning_rates.lrm``) trained every ``lrm_update_every`` steps to agree with the
  expert: for ``lrm_batch_size`` rows, the candidates {student output, EMA-target output, real
  latent} are decoded (no grad) and scored by the expert; the LRM's pairwise preferences are pulled
  to the expert's with a KL loss. The student's loss back-propagates into the student only, the
  alignment loss into the LRM only (the trainer back-propagates each loss into its own group).

Export is LCD's: a stock ``StableDiffusionPipeline`` + ``LCMScheduler`` folder (or LoRA weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.trainers.lcd import LCD, LCDConfig
from fastgen.trainers.method import StepOutput, register_method


@dataclass
class RGLCDConfig(LCDConfig):
    """RG-LCD options: every LCD option plus

    Attributes:
        mode: ``"direct"`` (expert reward on decoded pixels) or ``"lrm"`` (latent proxy reward).
        reward: the expert reward model, a name (``digits``, ``hpsv2``, ``pickscore``, ``imagereward``,
            ``clip``) or a dict ``{name: ..., <options>}`` / ``{weighted: {...}}`` for
            :func:`fastgen.rewards.load_reward`.
        reward_scale: ``beta``.
        lrm_path: folder of a pre-trained LRM (``fastgen lrm pretrain``); with ``lrm_pretrain_if_missing``
            (digits world only) it is pre-trained there first when absent.
        lrm_pretrain: overrides of :class:`~fastgen.rewards.latent_proxy.LRMPretrainConfig`.
        lrm_update_every: the LRM steps every k-th student step (1 = RG-LCD's 1:1 ratio).
        lrm_batch_size: rows of the batch used for the alignment loss (RG-LCD: 16).
        lrm_loss_scale: multiplier of the alignment loss.
        smooth_gt_label: for pairs with the real latent where the expert prefers the generated one,
            use the preference (0.5, 0.5).
    """

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
class RGLCD(LCD):
    name = "rg-lcd"
    config_class = RGLCDConfig

    def __init__(self, config: RGLCDConfig):
        super().__init__(config)
        from fastgen.rewards import load_reward

        self.reward_model = load_reward(config.reward)
        self.lrm = None
        if config.mode == "lrm":
            self.lrm = self._load_lrm(config)
            self.lrm.train()

    # ------------------------------------------------------------------ LRM

    def _load_lrm(self, cfg: RGLCDConfig):
        from fastgen.rewards.latent_proxy import LatentRewardModel, LRMPretrainConfig, pretrain_lrm

        path = Path(cfg.lrm_path)
        if not (path / "config.json").is_file():
            if not (cfg.lrm_pretrain_if_missing and self.is_digits_world()):
                raise ModelLoadError(
                    f"no latent reward model at {path} (config.json + model.safetensors); pre-train one with "
                    f"`fastgen lrm pretrain teacher={cfg.teacher} out={path}`"
                )
            pretrain_lrm(LRMPretrainConfig(**{"teacher": cfg.teacher, "out": str(path), **cfg.lrm_pretrain}))
        lrm = LatentRewardModel.from_pretrained(path, trainable=True)
        t = self.teacher
        size = self.resolution // t.vae_scale_factor
        lrm.check_compatible(t.latent_channels, size)
        return lrm

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = super().parameter_groups()
        if self.lrm is not None:
            groups["lrm"] = [p for p in self.lrm.parameters() if p.requires_grad]
        return groups

    def optimizers_to_step(self, step: int) -> list[str]:
        names = ["student"]
        if self.lrm is not None and step % self.config.lrm_update_every == 0:
            names.append("lrm")
        return names

    # ------------------------------------------------------------------ the step

    def decode_01(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0,1] (gradients reach the latents)."""
        return (self.teacher.decode(latents) + 1.0) / 2.0

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        captions = batch.get("caption")
        if captions is None:
            raise DataError("RG-LCD needs the captions as text for its reward model; the batch has none "
                            "(set lcd.use_latent_cache=false, or use a cache that keeps captions)")
        prompts = [captions] if isinstance(captions, str) else list(captions)
        latents, embeds = self.encode_batch(batch)
        b, device = latents.shape[0], latents.device
        if len(prompts) < b:
            raise DataError(f"{len(prompts)} prompts for a batch of {b}: RG-LCD needs one prompt per image")
        cfg = self.config
        index = torch.randint(0, cfg.num_ddim_timesteps, (b,)).to(device)
        noise = torch.randn_like(latents)
        w = self.sample_guidance(b, device)
        out = self.compute_loss(latents, embeds, index, noise, w)
        pred = out["pred"]
        if cfg.mode == "direct":
            reward = self.reward_model(self.decode_01(pred), prompts)
        else:
            reward = self.lrm(pred, prompts)
        student_loss = out["loss"] - cfg.reward_scale * reward.mean()
        losses = {"student": student_loss}
        logs = {"loss": float(student_loss.detach()), "lcd_loss": float(out["loss"].detach()),
                "reward": float(reward.detach().mean()), "w_mean": float(w.mean())}
        if self.lrm is not None and "lrm" in self.optimizers_to_step(step):
            lrm_loss, acc, expert_mean = self.alignment_loss(pred.detach(), out["target"].detach(), latents, prompts)
            losses["lrm"] = lrm_loss
            logs.update(lrm_loss=float(lrm_loss.detach()), lrm_agreement=float(acc), expert_reward=float(expert_mean))
        return StepOutput(losses=losses, logs=logs)

    def alignment_loss(self, student: torch.Tensor, target: torch.Tensor, real: torch.Tensor, prompts: list[str]):
        """Pairwise KL between the expert's and the LRM's preferences over {student, target, real}."""
        from fastgen.rewards.latent_proxy import pairwise_preference_loss

        k = min(self.config.lrm_batch_size, student.shape[0])
        rows = torch.randperm(student.shape[0])[:k]
        cands = torch.stack([student[rows], target[rows], real[rows]], dim=1)  # [k, 3, C, h, w]
        flat = cands.flatten(0, 1)
        ps = [prompts[int(i)] for i in rows for _ in range(3)]
        with torch.no_grad():
            images = self.decode_01(flat.float())
            expert = self.reward_model(images, ps).float() * self.reward_model.preference_scale()
        lrm_logits = self.lrm.logits(flat, ps).view(k, 3)
        loss, acc = pairwise_preference_loss(expert.view(k, 3), lrm_logits, smooth_gt_label=self.config.smooth_gt_label)
        return loss * self.config.lrm_loss_scale, acc, expert.view(k, 3).mean()

    # ------------------------------------------------------------------ state and export

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
                raise ModelLoadError("this checkpoint has no latent reward model (rg_lcd.mode=direct run?); "
                                     "resume it with rg_lcd.mode=direct")
            self.lrm.load_state_dict(lrm_state, strict=True)

    def _common_info(self) -> dict[str, Any]:
        info = super()._common_info()
        cfg = self.config
        info["method"] = f"rg-lcd-{cfg.mode}" + ("-lora" if self.is_lora else "")
        info["reward"] = self.reward_model.describe()
        info["reward_scale"] = cfg.reward_scale
        if self.lrm is not None:
            info["lrm_path"] = str(cfg.lrm_path)
        return info


__all__ = ["RGLCD", "RGLCDConfig"]
