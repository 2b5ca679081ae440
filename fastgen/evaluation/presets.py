"""Prompt sets paired with reference images: the COCO FID presets and plain prompt-file + folder pairs.

Presets read local copies only (nothing is downloaded):

* ``coco2014-30k@256``: COCO 2014 val, 30,000 images drawn with a fixed seed, one caption per
  image drawn with the same seed, long-edge centre crop + LANCZOS resize to 256 (the zero-shot
  text-to-image protocol of GigaGAN / DMD-style papers).
* ``coco2017-5k@512``: COCO 2017 val, all 5,000 images, one caption each (seeded), centre crop +
  bicubic resize to 512.

Layout under ``--data-root``: ``annotations/captions_val2014.json`` + ``val2014/`` (resp. 2017),
exactly as the COCO download unpacks. ``limit`` takes the first N pairs of the seeded order for
quick runs; it is recorded in the protocol, so a limited FID is never mistaken for the full one.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from fastgen.errors import ConfigError, DataError
from fastgen.evaluation.fid import FolderReference, Preprocess, list_images


@dataclass(frozen=True)
class FIDPreset:
    name: str
    split: str
    annotations: str
    num_pairs: int
    resolution: int
    resize_filter: str
    seed: int = 2024

    def describe(self) -> dict:
        return asdict(self)


PRESETS = {
    "coco2014-30k@256": FIDPreset("coco2014-30k@256", "val2014", "annotations/captions_val2014.json", 30000, 256, "lanczos"),
    "coco2017-5k@512": FIDPreset("coco2017-5k@512", "val2017", "annotations/captions_val2017.json", 5000, 512, "bicubic"),
}


@dataclass
class PromptImagePairs:
    """Prompts with the real image each was written for, and how to compare generated images with them."""

    name: str
    prompts: list[str]
    files: list[Path]
    folder: Path
    preprocess: Preprocess
    protocol: dict

    def reference(self) -> FolderReference:
        return FolderReference(self.folder, self.files)


def prompts_sha(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def load_preset(name: str, data_root: str | Path, limit: int | None = None) -> PromptImagePairs:
    if name not in PRESETS:
        raise ConfigError(f"unknown FID preset {name!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    root = Path(data_root)
    ann_path, img_dir = root / p.annotations, root / p.split
    if not ann_path.is_file():
        raise DataError(f"preset {name} needs the COCO captions file {ann_path} (from the COCO {p.split[-4:]} "
                        f"annotations archive); pass --data-root pointing at the folder holding annotations/ and {p.split}/")
    if not img_dir.is_dir():
        raise DataError(f"preset {name} needs the COCO image folder {img_dir}; unpack {p.split}.zip under --data-root")
    try:
        ann = json.loads(ann_path.read_text())
        images = {im["id"]: im["file_name"] for im in ann["images"]}
        captions: dict[int, list[str]] = {}
        for a in ann["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{ann_path} is not a COCO captions file ({type(e).__name__}: {e})") from e
    ids = sorted(i for i in images if captions.get(i))
    rng = random.Random(p.seed)
    rng.shuffle(ids)
    if len(ids) < p.num_pairs:
        raise DataError(f"preset {name} needs {p.num_pairs} captioned images but {ann_path} lists {len(ids)}")
    ids = ids[: p.num_pairs]
    if limit:
        ids = ids[:limit]
    files, prompts, missing = [], [], []
    for i in ids:
        f = img_dir / images[i]
        if not f.is_file():
            missing.append(f)
        files.append(f)
        prompts.append(rng.choice(sorted(captions[i])))
    if missing:
        raise DataError(f"preset {name}: {len(missing)} image(s) listed in {ann_path.name} are missing from {img_dir}, "
                        f"e.g. {', '.join(str(m) for m in missing[:3])}")
    protocol = {"preset": p.describe(), "pairs": len(prompts), "limit": limit, "prompts_sha256_16": prompts_sha(prompts),
                "caption_choice": f"one caption per image, random.Random({p.seed})"}
    return PromptImagePairs(name, prompts, files, img_dir, Preprocess(p.resolution, p.resize_filter, True), protocol)


def load_paired_folder(prompts_file: str | Path, images_dir: str | Path, preprocess: Preprocess | None = None) -> PromptImagePairs:
    """A prompt file whose line i describes the i-th image (sorted by name) of ``images_dir``."""
    from fastgen.data.prompts import load_prompts

    prompts = load_prompts(prompts_file)
    files = list_images(images_dir)
    if len(prompts) != len(files):
        raise DataError(f"{prompts_file} holds {len(prompts)} prompts but {images_dir} holds {len(files)} images; "
                        f"they must pair one to one (prompt i <-> i-th image sorted by file name)")
    protocol = {"prompts_file": str(prompts_file), "images": str(images_dir), "pairs": len(prompts),
                "prompts_sha256_16": prompts_sha(prompts)}
    return PromptImagePairs(Path(images_dir).name, prompts, files, Path(images_dir), preprocess or Preprocess(), protocol)
