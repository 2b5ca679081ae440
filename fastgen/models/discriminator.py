"""A latent-space GAN discriminator on the features of a frozen copy of the teacher UNet's encoder.

Used by SCott's adversarial loss. The backbone is a **copy** of the teacher UNet's down blocks (and
mid block when tapped), without any of the student's LoRA adapters: a LoRA-mode student adapts the
teacher's own UNet, so the discriminator never runs, trains or checkpoints those adapters. The copy
is frozen; optionally it carries LoRA adapters of its own (``lora_rank > 0``, peft adapter name
``discriminator``). Small trainable heads read the tapped feature maps:

    h_l      = SiLU(FiLM_t(GroupNorm(conv3x3(F_l))))          per tapped block l, FiLM from the timestep
    logit_l  = mean_xy conv1x1(h_l) + <mean_xy h_l, P_l c> / sqrt(H)   (projection term on the text c)
    D(x_t, t, c) = mean_l logit_l

The backbone itself sees the text (cross-attention) and the timestep, as in the teacher. The forward
stops after the last tapped block (the up blocks are dropped from the copy).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastgen.errors import ConfigError
from fastgen.models.teacher import PromptEmbeds, Teacher

__all__ = ["FeatureTap", "LatentDiscriminator", "copy_without_adapters", "feature_layer_names"]

DISCRIMINATOR_ADAPTER = "discriminator"


def feature_layer_names(unet: torch.nn.Module) -> list[str]:
    """The blocks of a diffusers UNet a discriminator may tap, in execution order."""
    names = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", [])))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names


def copy_without_adapters(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``net`` with every peft adapter layer replaced by its base layer (no adapters, no peft config)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(net)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    if getattr(out, "_hf_peft_config_loaded", False):
        out._hf_peft_config_loaded = False
        out.__dict__.pop("peft_config", None)
    return out


class _Stop(Exception):
    """Raised by the last feature hook: the rest of the network is not needed."""


class FeatureTap:
    """Forward hooks recording the outputs of named blocks; the forward stops after the last one."""

    def __init__(self, net: torch.nn.Module, layers: list[str]):
        order = feature_layer_names(net)
        self.layers = sorted(layers, key=order.index)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [net.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self.features[name] = output[0] if isinstance(output, tuple) else output
            if name == self.layers[-1]:
                raise _Stop

        return hook

    def run(self, fn) -> list[torch.Tensor]:
        """Call ``fn()`` (a forward of the tapped network) and return the tapped features in execution order."""
        self.features = {}
        try:
            fn()
        except _Stop:
            pass
        missing = [n for n in self.layers if n not in self.features]
        if missing:
            raise RuntimeError(f"the forward never reached the tapped block(s) {missing}")
        out = [self.features[n] for n in self.layers]
        self.features = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _timestep_features(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal features of ``t / T`` (``[B] -> [B, dim]``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = (t.float() / num_train_timesteps * 1000.0)[:, None] * freqs[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class _Head(torch.nn.Module):
    def __init__(self, channels: int, hidden: int, cond_dim: int, text_dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = torch.nn.GroupNorm(min(32, hidden // 4) if hidden % 4 == 0 else 1, hidden)
        self.film = torch.nn.Linear(cond_dim, 2 * hidden)
        self.out = torch.nn.Conv2d(hidden, 1, 1)
        self.text = torch.nn.Linear(text_dim, hidden)
        torch.nn.init.zeros_(self.film.weight)
        torch.nn.init.zeros_(self.film.bias)
        self.hidden = hidden

    def forward(self, feat: torch.Tensor, t_emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(feat.float()))
        scale, shift = self.film(t_emb).chunk(2, dim=1)
        h = F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        logit = self.out(h).mean(dim=(1, 2, 3))
        proj = (h.mean(dim=(2, 3)) * self.text(text)).sum(1) / math.sqrt(self.hidden)
        return logit + proj


class LatentDiscriminator(torch.nn.Module):
    """``D(x_t, t, c) -> [B]`` logits on noisy latents of the teacher's space (see the module docstring).

    Args:
        teacher: the frozen teacher (its UNet is copied; its conventions run the copy).
        layers: the tapped blocks, names from :func:`feature_layer_names` (e.g. ``["down_blocks.1", "mid_block"]``).
        head_channels: width of each head.
        lora_rank: rank of the backbone copy's own LoRA (0: frozen backbone, heads only).
        lora_targets: modules of the copy that get LoRA when ``lora_rank > 0``.
        seed: seed of the heads' (and LoRA's) initialisation.
        section: recipe section named in error messages.
    """

    def __init__(self, teacher: Teacher, layers: list[str], head_channels: int = 64, lora_rank: int = 0,
                 lora_targets: list[str] | None = None, seed: int = 0, section: str = "scott"):
        super().__init__()
        if teacher.family not in ("sd", "sdxl"):
            raise ConfigError(f"{section}: the latent discriminator taps a UNet teacher (SD / SDXL), not '{teacher.family}'")
        valid = feature_layer_names(teacher.net)
        bad = [name for name in layers if name not in valid]
        if bad or not layers:
            what = f"{bad} is not a block of the teacher UNet" if bad else "no discriminator layer is given"
            raise ConfigError(f"{section}.disc_layers: {what}; valid layers: {', '.join(valid)}")
        object.__setattr__(self, "teacher", teacher)  # conventions only: not a submodule, not checkpointed here
        self.layers = sorted(set(layers), key=valid.index)
        self.section = section
        backbone = copy_without_adapters(teacher.net)
        backbone.up_blocks = torch.nn.ModuleList()  # never reached: the forward stops at the last tapped block
        backbone.conv_norm_out = backbone.conv_out = None
        last = valid.index(self.layers[-1])
        n_down = len(backbone.down_blocks)
        if last < n_down:
            backbone.down_blocks = torch.nn.ModuleList(list(backbone.down_blocks)[: last + 1])
            backbone.mid_block = None
        backbone.requires_grad_(False).eval()
        self.backbone = backbone
        self.lora_rank = int(lora_rank)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.lora_rank > 0:
                self._add_lora(list(lora_targets or ["to_q", "to_k", "to_v", "to_out.0"]))
            channels = self._feature_channels()
            self.cond_dim = 128
            self.time_mlp = torch.nn.Sequential(torch.nn.Linear(self.cond_dim, self.cond_dim), torch.nn.SiLU())
            text_dim = int(teacher.net.config.cross_attention_dim)
            self.heads = torch.nn.ModuleList([_Head(c, head_channels, self.cond_dim, text_dim) for c in channels])
        self.tap = FeatureTap(self.backbone, self.layers)

    def _add_lora(self, targets: list[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        names = [n for n, _ in self.backbone.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ConfigError(f"{self.section}.disc_lora_target_modules {missing} do not exist in the tapped blocks of the teacher UNet")
        config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, target_modules=targets)
        inject_adapter_in_model(config, self.backbone, adapter_name=DISCRIMINATOR_ADAPTER)
        for name, p in self.backbone.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)

    @torch.no_grad()
    def _feature_channels(self) -> list[int]:
        t = self.teacher
        x = torch.zeros(1, t.latent_channels, 8, 8, device=t.device, dtype=t.dtype)
        probe = FeatureTap(self.backbone, self.layers)
        try:
            embeds = t.encode_prompt([""])
            feats = probe.run(lambda: t.forward(x, torch.tensor([1]), embeds, net=self.backbone))
        finally:
            probe.remove()
        return [int(f.shape[1]) for f in feats]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, double_backward: bool = False) -> torch.Tensor:
        """Logits ``[B]``. ``double_backward=True`` (an R1 penalty differentiates the input gradient) runs attention
        with the math kernel: the fused CPU/GPU attention kernels have no second derivative."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        kernels = sdpa_kernel([SDPBackend.MATH]) if double_backward else contextlib.nullcontext()
        with kernels:
            feats = self.tap.run(lambda: self.teacher.forward(x_t, t, embeds, net=self.backbone))
        t_emb = self.time_mlp(_timestep_features(t, self.cond_dim, int(self.teacher.schedule.num_train_timesteps)))
        hidden = embeds.expand(x_t.shape[0]).hidden.to(x_t.device).float()
        text = embeds.pooled.to(x_t.device).float() if embeds.pooled is not None and embeds.pooled.shape[-1] == hidden.shape[-1] \
            else hidden.mean(dim=1)
        logits = [head(f, t_emb, text) for head, f in zip(self.heads, feats)]
        return torch.stack(logits, dim=0).mean(dim=0)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, lora_rank={self.lora_rank}"
