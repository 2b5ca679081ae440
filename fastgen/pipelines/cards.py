"""Model-card builders per export kind: ``info`` (the export's ``fastgen_export.json`` facts) -> card dict
(:func:`fastgen.pipelines.model_card.render_model_card`)."""

from __future__ import annotations

from typing import Any

__all__ = ["clear_card", "consistency_card", "one_step_card"]

_CONSISTENCY_TRAINING = (
    "num_ddim_timesteps", "w_min", "w_max", "w_embedding_dim", "loss", "huber_c", "timestep_scaling", "ema_decay",
    "lora", "lora_rank", "lora_alpha", "lora_guidance", "caption_dropout", "reward_scale", "mode",
)
_ONE_STEP_TRAINING = ("guidance_scale", "num_intervals", "delta", "min_dlambda", "boundary_weight", "t_max", "ema_decay")
_CLEAR_TRAINING = ("radius", "down_factor", "caption_dropout", "fm_weight", "kd_weight", "attn_weight", "align_every")


def _described(info: dict[str, Any], guidance: str, weights: str, usage: str, training_keys: tuple[str, ...]) -> dict[str, Any]:
    """The card entries every export kind fills the same way."""
    return {
        "guidance": guidance,
        "weights": weights,
        "resolution": info["resolution"],
        "metrics": info.get("metrics") or {},
        "metadata": info.get("metadata") or {},
        "usage": usage,
        "training": {k: v for k, v in info["config"].items() if k in training_keys},
    }


def consistency_card(info: dict[str, Any]) -> dict[str, Any]:
    """Card of a consistency student (LCD, RG-LCD, SCott): a full pipeline with an LCMScheduler, or LoRA weights."""
    cfg = info["config"]
    steps, res = info["num_inference_steps"], info["resolution"]
    lora = info["export"] == "lora"
    if lora:
        baked = info["baked_guidance_lcm_form"]
        baked_txt = (
            f"w = {baked} (teacher CFG scale {baked + 1:g})"
            if not isinstance(baked, list)
            else f"w sampled in [{baked[0]:g}, {baked[1]:g}] (teacher CFG scales {baked[0] + 1:g} to {baked[1] + 1:g})"
        )
        usage = (
            "from diffusers import DiffusionPipeline, LCMScheduler\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{info["base_model_path"]}")  # base: {info["base_model"]}\n'
            'pipe.scheduler = LCMScheduler.from_pretrained("<this folder>")  # or LCMScheduler.from_config(pipe.scheduler.config)\n'
            'pipe.load_lora_weights("<this folder>")\n'
            f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale=1.0, height={res}, width={res}).images[0]'
        )
        guidance = (
            f"Classifier-free guidance is baked into the LoRA: during distillation the teacher used {baked_txt}, "
            "with w in the LCM form `x_c + w (x_c - x_u)` (= diffusers guidance_scale w + 1). Use "
            "`guidance_scale=1.0` (values above 1 make the stock pipeline run real CFG on top; 1 to 2 may still help)."
        )
        weights = "LoRA adapters (peft format, `unet.` prefix) in `pytorch_lora_weights.safetensors`; load with `pipe.load_lora_weights`."
        title = f"LCM-LoRA distilled from {info['base_model']}"
    elif info.get("scheduler") == "FlowMatchLCMScheduler":
        return _flow_consistency_card(info)
    else:
        g = info["guidance_scale"]
        lo, hi = info["guidance_scale_range"]
        usage = (
            "from diffusers import DiffusionPipeline\n\n"
            'pipe = DiffusionPipeline.from_pretrained("<this folder>")\n'
            f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={g:g}, height={res}, width={res}).images[0]'
        )
        guidance = (
            f"The UNet embeds the guidance weight (time_cond_proj_dim={info['time_cond_proj_dim']}); no unconditional pass "
            f"runs. fastgen trains with w in the LCM form `x_c + w (x_c - x_u)`, w in [{lo - 1:g}, {hi - 1:g}]. "
            f"`{info['pipeline_class']}` embeds `guidance_scale - 1`, so `guidance_scale = w + 1`: a value g here means "
            f"the teacher's own pipeline at guidance_scale g. Trained range: guidance_scale {lo:g} to {hi:g}; default {g:g}."
        )
        which = "EMA target" if info["unet_weights"] == "ema_target" else "online student"
        weights = (
            f"`unet/` holds the {which} weights (EMA decay {info['ema_decay']}), stored as {info['unet_dtype']}; the "
            "text encoder(s), tokenizer(s) and VAE are the teacher's, unchanged."
        )
        title = f"LCM distilled from {info['teacher']}"
    return {
        "title": title,
        "method": info.get("method_title", "Latent Consistency Distillation") + (" (LoRA)" if lora else ""),
        "teacher": f"{info['teacher']} ({info['teacher_pipeline_class']}, {info['prediction_type']} prediction)",
        "pipeline_class": info["pipeline_class"],
        "scheduler": (
            f"LCMScheduler (original_inference_steps={info['original_inference_steps']}, "
            f"timestep_scaling={info['timestep_scaling']:g})"
        ),
        "steps": f"{steps} (LCMScheduler accepts 1 to {info['original_inference_steps']})",
        **_described(info, guidance, weights, usage, _CONSISTENCY_TRAINING),
        "tags": ["fastgen", "lcm", "latent-consistency", "distillation"] + (["lora"] if lora else []),
    }


def _flow_consistency_card(info: dict[str, Any]) -> dict[str, Any]:
    """Card of the consistency student of a flow-matching (Flux) teacher: a FluxPipeline with a FlowMatchLCMScheduler."""
    steps, res, g = info["num_inference_steps"], info["resolution"], info["guidance_scale"]
    lo, hi = info["guidance_scale_range"]
    usage = (
        "import torch\nfrom diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("<this folder>")\n'
        "torch.manual_seed(0)  # FlowMatchLCMScheduler re-noises from torch's global generator\n"
        f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={g:g}, height={res}, width={res}, '
        + (f'max_sequence_length={info["max_sequence_length"]}, ' if info.get("max_sequence_length") else "")
        + "generator=torch.Generator().manual_seed(0)).images[0]"
    )
    guidance = (
        "The transformer embeds the guidance scale (`guidance_embeds`, as FLUX.1-dev); no unconditional pass runs. "
        f"`guidance_scale = g` means the teacher sampled with CFG scale g; trained range {lo:g} to {hi:g}, default {g:g}. "
        "Leave `true_cfg_scale` at 1."
    )
    which = "EMA target" if info["transformer_weights"] == "ema_target" else "online student"
    weights = (
        f"`transformer/` holds the {which} weights (EMA decay {info['ema_decay']}), stored as {info['transformer_dtype']}; "
        "the text encoders, tokenizers and VAE are the teacher's, unchanged."
    )
    return {
        "title": f"Flow-matching LCM distilled from {info['teacher']}",
        "method": info.get("method_title", "Latent Consistency Distillation") + " (flow matching)",
        "teacher": f"{info['teacher']} ({info['teacher_pipeline_class']}, {info['prediction_type']} prediction)",
        "pipeline_class": info["pipeline_class"],
        "scheduler": "FlowMatchLCMScheduler (x0 = x - sigma v, re-noised to the next sigma)",
        "steps": f"{steps} (any; trained on a grid of {info['num_grid_steps']} sigmas, which holds every N dividing it)",
        **_described(info, guidance, weights, usage, _CONSISTENCY_TRAINING),
        "tags": ["fastgen", "lcm", "latent-consistency", "flow-matching", "distillation"],
    }


def clear_card(info: dict[str, Any]) -> dict[str, Any]:
    """Card of a CLEAR export (a Flux pipeline whose transformer uses local attention)."""
    res, steps = info["resolution"], info["num_inference_steps"]
    if info["guidance_mode"] == "embedded":
        call = f'guidance_scale={info["guidance_scale"]:g}'
        guidance = (
            f"The transformer is guidance-distilled: `guidance_scale={info['guidance_scale']:g}` is embedded "
            "(no unconditional pass), as for the teacher."
        )
    elif info["true_cfg_scale"] > 1:
        call = f'true_cfg_scale={info["true_cfg_scale"]:g}, negative_prompt="", guidance_scale=1.0'
        guidance = (
            f"True classifier-free guidance against the empty prompt: `true_cfg_scale={info['true_cfg_scale']:g}` "
            "with `negative_prompt=\"\"` (FluxPipeline only runs the unconditional pass when both are given; "
            "`guidance_scale` is ignored by a transformer without guidance embedding)."
        )
    else:
        call = "guidance_scale=1.0"
        guidance = "No guidance (the teacher's default)."
    usage = (
        "import fastgen  # registers ClearFluxTransformer2DModel for diffusers' loader\n"
        "from diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("<this folder>")\n'
        f'image = pipe("a prompt", num_inference_steps={steps}, {call}, height={res}, width={res}, '
        f'max_sequence_length={info["max_sequence_length"]}).images[0]'
    )
    weights = (
        "`transformer/` is a `ClearFluxTransformer2DModel` (a `FluxTransformer2DModel` subclass from fastgen) whose "
        f"attention is CLEAR local attention: radius {info['radius']} tokens ({info['window_tokens']} image tokens per "
        f"interior window, {100 * info['window_fraction']:.2f}% of the {info['image_tokens']} image tokens at {res} px)"
        + (f", plus {info['pooled_tokens']} pooled KV tokens (the image pooled in {info['down_factor']}x{info['down_factor']} "
           "cells with learned weights) that every image query also sees" if info["down_factor"] > 1 else "")
        + ". Only the image-stream attention projections (to_q/to_k/to_v/to_out) were trained; everything else, the "
        "text encoders and the VAE are the teacher's. `model_index.json` lists the transformer as "
        "`[\"fastgen\", \"ClearFluxTransformer2DModel\"]`: import fastgen before loading."
    )
    return {
        "title": f"CLEAR (r={info['radius']}) distilled from {info['teacher']}",
        "method": "CLEAR: convolution-like local attention distillation",
        "teacher": f"{info['teacher']} ({info['teacher_pipeline_class']})",
        "pipeline_class": info["pipeline_class"],
        "scheduler": f"{info['scheduler']} (the teacher's)",
        "steps": steps,
        **_described(info, guidance, weights, usage, _CLEAR_TRAINING),
        "tags": ["fastgen", "clear", "local-attention", "distillation", "flux"],
    }


def one_step_card(info: dict[str, Any]) -> dict[str, Any]:
    """Card of a one-step generator exported as a stock pipeline + a one-step ``DDIMScheduler`` (BOOT)."""
    res, t = info["resolution"], info["readout_timestep"]
    usage = (
        "from diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("<this folder>")\n'
        f'image = pipe("a prompt", num_inference_steps=1, guidance_scale=1.0, height={res}, width={res}).images[0]'
    )
    guidance = (
        f"The teacher's classifier-free guidance (scale {info['teacher_guidance_scale']:g}) is distilled into the generator: "
        "call the pipeline with `guidance_scale=1.0` (a larger value makes the stock pipeline run an unconditional pass "
        "on top, which this generator was not trained for)."
    )
    weights = (
        f"`{info['component']}/` holds the {info['weights_label']} weights, stored as {info[info['component'] + '_dtype']}; the text "
        "encoder(s), tokenizer(s) and VAE are the teacher's, unchanged."
    )
    return {
        "title": f"{info['method_title']} one-step generator distilled from {info['teacher']}",
        "method": info["method_title"],
        "teacher": f"{info['teacher']} ({info['teacher_pipeline_class']}, {info['prediction_type']} prediction)",
        "pipeline_class": info["pipeline_class"],
        "scheduler": (f"DDIMScheduler, one step (timestep_spacing={info['scheduler_timestep_spacing']}: the network reads the "
                      f"starting noise at timestep {t}; its output is the sample, read as prediction_type="
                      f"{info['readout_prediction_type']})"),
        "steps": "1 only (the generator maps the starting noise to the sample; more steps feed it inputs it never saw)",
        **_described(info, guidance, weights, usage, _ONE_STEP_TRAINING),
        "tags": ["fastgen", "one-step", "distillation", info["method"]],
    }
