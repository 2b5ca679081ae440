"""Teacher-generated training data: latents the teacher sampled itself from a prompt list, built once.

Methods that train on the teacher's own outputs (CLEAR; any data-free method that wants a fixed
pool of teacher samples) share this cache. A folder per key holds ``latents.safetensors`` and
``prompts.json`` (the key, the prompts and how they were generated); it is written to a temp
folder and renamed when complete (:func:`fastgen.io.atomic_folder`), and reused when the key matches.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastgen.errors import DataError
from fastgen.io import atomic_folder

__all__ = ["TeacherSamples", "load_or_generate", "generate_with_pipeline"]


class TeacherSamples(torch.utils.data.Dataset):
    """Items ``{"latents": [C, h, w] float32, "caption": str}`` of a teacher-generated cache."""

    def __init__(self, latents: torch.Tensor, prompts: Sequence[str]):
        if len(latents) != len(prompts):
            raise DataError(f"the teacher-sample cache holds {len(latents)} latents but {len(prompts)} prompts; delete it")
        self.latents = latents
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "caption": self.prompts[index]}


def load_or_generate(
    folder: str | os.PathLike[str],
    key: str,
    prompts: Sequence[str],
    generate: Callable[[list[str]], torch.Tensor],
    meta: dict[str, Any] | None = None,
) -> TeacherSamples:
    """The cache in ``folder`` when its key is ``key``; else ``generate(prompts)`` (latents ``[N, C, h, w]``),
    written atomically, and returned.

    Raises:
        DataError: the cache is missing in a multi-process run (every rank would generate it).
    """
    folder = Path(folder)
    meta_path, lat_path = folder / "prompts.json", folder / "latents.safetensors"
    if meta_path.is_file() and lat_path.is_file():
        stored = json.loads(meta_path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return TeacherSamples(load_file(os.fspath(lat_path))["latents"], stored["prompts"])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise DataError(
            f"the teacher-sample cache '{folder}' does not exist yet; build it once in a single process before a "
            "multi-process run (every rank would sample it), e.g.\n  python -c \"from fastgen.trainers.engine.run "
            "import load_run_config, build_method; c, m = load_run_config('RECIPE'); build_method(c, m).train_dataset()\""
        )
    t0 = time.perf_counter()
    prompts = list(prompts)
    latents = generate(prompts).float().cpu().contiguous()
    if len(latents) != len(prompts):
        raise DataError(f"the teacher generated {len(latents)} latents for {len(prompts)} prompts")
    record = {"key": key, **(meta or {}), "count": len(prompts), "seconds": round(time.perf_counter() - t0, 1), "prompts": prompts}
    with atomic_folder(folder) as tmp:
        save_file({"latents": latents}, os.fspath(tmp / "latents.safetensors"))
        (tmp / "prompts.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return TeacherSamples(latents, prompts)


@torch.no_grad()
def generate_with_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    steps: int,
    batch_size: int,
    seed: int,
    call_kwargs: Callable[[int], dict[str, Any]],
    to_latents: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> torch.Tensor:
    """Latents sampled by a diffusers ``pipe`` (``output_type="latent"``), float32 on the CPU.

    Batch ``i`` (starting at prompt ``i``) uses ``torch.Generator().manual_seed(seed + i)``;
    ``call_kwargs(batch)`` adds the pipeline's guidance/size arguments; ``to_latents`` unpacks the
    pipeline's latent output (e.g. Flux's packed tokens) to ``[B, C, h, w]``.
    """
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    out = []
    prompts = list(prompts)
    for i in tqdm(range(0, len(prompts), batch_size), desc="teacher samples", mininterval=10):
        chunk = prompts[i : i + batch_size]
        gen = torch.Generator(device=device).manual_seed(seed + i)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            latents = pipe(chunk, num_inference_steps=steps, generator=gen, output_type="latent", **call_kwargs(len(chunk))).images
        out.append(to_latents(latents.float()).cpu())
    return torch.cat(out)
