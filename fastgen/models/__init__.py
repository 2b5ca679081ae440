"""fastgen.models: frozen diffusion teachers and pipeline loading.

``Teacher`` wraps a local diffusers pipeline folder (SD1.x/2.x, SDXL, Flux, SD3, PixArt) behind
one interface; ``load_pipeline`` validates and loads such a folder with clear errors.
"""

from fastgen.models.loading import SUPPORTED_PIPELINES, check_pipeline_folder, load_pipeline
from fastgen.models.teacher import PromptEmbeds, Teacher, pack_latents, unpack_latents

__all__ = [
    "SUPPORTED_PIPELINES",
    "PromptEmbeds",
    "Teacher",
    "check_pipeline_folder",
    "load_pipeline",
    "pack_latents",
    "unpack_latents",
]
