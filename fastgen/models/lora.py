"""LoRA adapters (peft) on a teacher network: one network in memory, adapters off = the teacher."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastgen.errors import ConfigError, ModelLoadError

__all__ = ["LoRA", "DEFAULT_UNET_TARGETS"]

#: LoRA targets of the diffusers LCM-LoRA scripts (attention, feed-forward, resnet convs, resampling convs).
DEFAULT_UNET_TARGETS: list[str] = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


def _adaptable_module_names(net: torch.nn.Module, limit: int = 12) -> list[str]:
    seen: list[str] = []
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            parts = name.split(".")
            short = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
            if short not in seen:
                seen.append(short)
        if len(seen) >= limit:
            break
    return seen


class LoRA:
    """peft LoRA adapters injected into ``net`` (float32 adapters; ``lora_B = 0`` so it starts as ``net``).

    Args:
        net: the network to adapt (a diffusers model with ``add_adapter``).
        targets, rank, alpha, dropout: the peft ``LoraConfig``.
        seed: seed of the adapters' initialisation.
        section: recipe section named in error messages (e.g. ``lcd``).
    """

    def __init__(self, net: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
                 seed: int = 0, section: str = "lora"):
        names = [n for n, _ in net.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ConfigError(
                f"LoRA target module(s) {missing} do not exist in the teacher network ({type(net).__name__}); modules "
                f"that can be adapted include: {', '.join(_adaptable_module_names(net))}. Fix {section}.lora_target_modules"
            )
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.net, self.section, self.rank = net, section, rank
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net.add_adapter(config)
        self.layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        for name, p in net.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                p.data = p.data.float()

    @staticmethod
    def is_adapter(name: str) -> bool:
        return "lora_" in name

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.net.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the network as the plain teacher inside this block."""
        for m in self.layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in self.layers:
                m.enable_adapters(True)
            for p in self.parameters():
                p.requires_grad_(True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights in the key format ``pipe.load_lora_weights`` reads (peft's ``<module>.lora_A.weight``),
        before the ``unet.`` prefix ``save_lora_weights`` adds."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.net)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def adapter_metadata(self) -> dict:
        return self.net.peft_config["default"].to_dict()

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.net.named_parameters() if "lora_" in n}

    def load(self, given: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed adapter weights (``named_weights`` keys) in, with errors naming the fix."""
        own = {n: p for n, p in self.net.named_parameters() if "lora_" in n}
        missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        if missing or unexpected:
            raise ModelLoadError(
                f"the checkpoint's LoRA layers do not match the recipe's {self.section}.lora_target_modules: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                "use the lora_target_modules the run was trained with"
            )
        for n, p in own.items():
            v = given[n]
            if v.shape != p.shape:
                raise ConfigError(
                    f"LoRA weight '{n}' has shape {tuple(v.shape)} in the checkpoint but {tuple(p.shape)} here "
                    f"({self.section}.lora_rank={self.rank}); set {self.section}.lora_rank to the run's rank"
                )
            with torch.no_grad():
                p.copy_(v.to(p.dtype))
