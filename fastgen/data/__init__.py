"""fastgen.data: the digits world, image-caption folders, webdataset shards, prompt lists and
an on-disk cache of VAE latents and text embeddings."""

from fastgen.data.cache import CachedDataset, EmbeddingCache, cache_key
from fastgen.data.digits import DigitsDataset, eval_prompts
from fastgen.data.folders import ImageCaptionFolder
from fastgen.data.prompts import PromptDataset, ensure_batch, load_prompts
from fastgen.data.shards import ImageCaptionShards, write_shards

__all__ = [
    "CachedDataset",
    "DigitsDataset",
    "EmbeddingCache",
    "ImageCaptionFolder",
    "ImageCaptionShards",
    "PromptDataset",
    "cache_key",
    "ensure_batch",
    "eval_prompts",
    "load_prompts",
    "write_shards",
]
