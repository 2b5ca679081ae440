"""Checkpoint state and sampling of a :class:`~fastgen.trainers.consistency.ConsistencyStudent` (``self`` below):
what its methods ``state``, ``load_state`` and ``sample`` run, kept apart from the networks and the loss."""

from __future__ import annotations

import torch

from fastgen.diffusion import lcm_timesteps, multistep_consistency_sample, pipeline_flow_sigmas, randn_like_diffusers
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.models.teacher import pack_latents, unpack_latents

__all__ = ["load_student_state", "sample_student", "student_state"]

_COND_PROJ_KEY = "time_embedding.cond_proj.weight"


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def student_state(self) -> dict[str, torch.Tensor]:
    if self.lora is not None:
        return {f"lora.{n}": p for n, p in self.lora.named_weights().items()}
    state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
    state.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
    return state


def load_student_state(self, state: dict[str, torch.Tensor]) -> None:
    s = self.section
    has_lora, has_full = any(k.startswith("lora.") for k in state), any(k.startswith("student.") for k in state)
    if self.is_lora and not has_lora:
        raise ModelLoadError(f"this checkpoint holds a full student but the recipe has {s}.lora=true; set {s}.lora=false to load it")
    if not self.is_lora and not has_full:
        raise ModelLoadError(
            f"this checkpoint holds LoRA weights but the recipe has {s}.lora=false; set {s}.lora=true (and the same "
            "lora_rank / lora_target_modules) to load it"
        )
    if self.lora is not None:
        self.lora.load({k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")})
        return
    key = f"student.{_COND_PROJ_KEY}"  # a UNet student's guidance embedding (a Flux one has fixed sizes: the strict load checks it)
    if not self.flow and key not in state:
        raise ModelLoadError(f"checkpoint has no guidance embedding ('{key}'); it is not a full consistency-student checkpoint")
    got, want = (int(state[key].shape[1]), int(self.cfg.w_embedding_dim)) if not self.flow else (0, 0)
    if got != want:
        raise ConfigError(
            f"the checkpoint's guidance embedding has size {got} (time_cond_proj_dim) but the recipe sets "
            f"{s}.w_embedding_dim={want}; set {s}.w_embedding_dim={got} to load this checkpoint"
        )
    for prefix, net in (("student.", self.student), ("target.", self.target)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"checkpoint '{prefix.rstrip('.')}' weights do not fit the student built from teacher "
                f"'{self.loaded.name}': {str(exc)[:400]}; use the teacher the run was trained with"
            ) from exc


@torch.no_grad()
def sample_student(self, prompts: list[str], num_steps: int, generator: torch.Generator, guidance_scale: float,
           weights: str = "target", resolution: int | None = None) -> torch.Tensor:
    """Images in [0, 1] by multistep consistency sampling on the exported scheduler's timesteps, drawing noise
    as the exported pipeline does (``x_T`` first, then one re-noise draw per step), so the export gives the
    same images. ``FlowMatchLCMScheduler`` re-noises from torch's global generator: here that stream is a
    generator seeded with ``generator.initial_seed()``, i.e. the pipeline's after ``torch.manual_seed(seed)``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    net, device = self.sampling_net(weights), self.device
    res = int(resolution or self.resolution)
    embeds = self.teacher.encode_prompt(prompts)
    b = len(embeds)
    w = None if self.is_lora else torch.full((b,), float(guidance_scale) - 1.0, device=device)
    x_T = randn_like_diffusers(self.teacher.latent_shape(b, res, res), generator=generator, device=device, dtype=embeds.dtype).float()
    noise_fn = None
    if self.flow:
        ts = pipeline_flow_sigmas(num_steps, self.teacher.schedule, self.mu)[:-1]
        renoise = torch.Generator(generator.device).manual_seed(generator.initial_seed())

        def noise_fn(x0: torch.Tensor) -> torch.Tensor:
            packed = randn_like_diffusers(pack_latents(x0).shape, generator=renoise, device=x0.device, dtype=x0.dtype)
            return unpack_latents(packed, x0.shape[-2], x0.shape[-1])
    else:
        ts = lcm_timesteps(num_steps, self.teacher.schedule.num_train_timesteps, original_inference_steps=self.cfg.num_ddim_timesteps)
    was_training = net.training
    net.eval()
    try:
        z0 = multistep_consistency_sample(lambda x, t: self.f(net, x, t, embeds, w), x_T, self.teacher.schedule, ts,
                                          generator=generator, noise_fn=noise_fn)
    finally:
        net.train(was_training)
    with _no_autocast(device):
        images = self.teacher.decode(z0.to(torch.float32))
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
