"""FID under one explicit protocol: quantise, preprocess, extract features, compare to cached
real-image statistics.

Every FID fastgen reports goes through :class:`FID`:

1. generated images in [0,1] are quantised to 8 bits exactly as writing them to PNG would
   (round, not truncate);
2. a :class:`Preprocess` (optional long-edge centre crop, then a PIL resize with a named filter on
   the uint8 image) is applied to generated and real images alike;
3. a feature backend turns uint8 images into features: the standard InceptionV3 (torchmetrics'
   ``FrechetInceptionDistance`` over torch-fidelity's network, weights from a *local* file) or
   any ``nn.Module`` (the digits classifier for the digits world);
4. torchmetrics accumulates the float64 sums and computes the distance.

Real-image statistics are cached as ``.npz`` keyed by a hash of the data set's identity, the
preprocessing and the backend (weights hash, antialias setting, torchmetrics version), so a
change to any of them invalidates the cache instead of silently reusing stale numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from fastgen.data.folders import decode_image
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.io import atomic_write_bytes

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE = (
    "torch-fidelity's conversion of the TF 2015-12-05 InceptionV3, released at "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
RESIZE_FILTERS = ("lanczos", "bicubic", "bilinear", "box", "nearest")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8, rounded like a PNG writer (torchmetrics' ``normalize`` truncates)."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _pil_filter(name: str):
    from PIL import Image

    return {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
            "box": Image.BOX, "nearest": Image.NEAREST}[name]


@dataclass(frozen=True)
class Preprocess:
    """Applied to real and generated uint8 images before features are taken.

    ``resolution=None`` keeps the size; otherwise a long-edge centre crop (``center_crop``) and a
    PIL resize of the uint8 image to ``resolution``x``resolution`` with ``resize_filter``.
    """

    resolution: int | None = None
    resize_filter: str = "bicubic"
    center_crop: bool = True

    def __post_init__(self):
        if self.resize_filter not in RESIZE_FILTERS:
            raise ConfigError(f"unknown resize filter {self.resize_filter!r}; choose one of {', '.join(RESIZE_FILTERS)}")
        if self.resolution is not None and self.resolution < 2:
            raise ConfigError(f"FID resolution must be at least 2 pixels, got {self.resolution}")

    def describe(self) -> dict:
        return asdict(self)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = quantize_uint8(images)
        if self.resolution is None:
            return images
        n, c, h, w = images.shape
        if h == w == self.resolution:
            return images
        from PIL import Image

        out = []
        for img in images:
            arr = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if c == 1 else arr)
            if self.center_crop and h != w:
                side = min(h, w)
                top, left = (h - side) // 2, (w - side) // 2
                pil = pil.crop((left, top, left + side, top + side))
            pil = pil.resize((self.resolution, self.resolution), _pil_filter(self.resize_filter))
            t = torch.from_numpy(np.asarray(pil).copy())
            out.append(t[None] if t.dim() == 2 else t.permute(2, 0, 1))
        return torch.stack(out)


# --------------------------------------------------------------------------------------------
# Feature backends: nn.Modules taking uint8 [N,3,H,W] and returning [N,D] features.


class FeatureBackend(Protocol):
    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


def _sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        read = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
            if limit and read >= limit:
                break
    return h.hexdigest()


def load_weights_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated file, not a torch file
        raise ModelLoadError(f"{what} weights file {path} cannot be read as plain tensors ({type(e).__name__}: {e}); "
                             f"fastgen only loads weights-only torch files or .safetensors") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{what} weights file {path} does not hold a state dict of tensors")
    return obj


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local InceptionV3 weights: ``path`` (file or folder), else ``$FASTGEN_INCEPTION_WEIGHTS``,
    else ``$TORCH_HOME/hub/checkpoints/<file>`` (where torch-fidelity would have cached a download)."""
    candidates: list[Path] = []
    if path is not None:
        p = Path(path)
        candidates.append(p / INCEPTION_WEIGHTS_FILE if p.is_dir() else p)
    elif os.environ.get("FASTGEN_INCEPTION_WEIGHTS"):
        candidates.append(Path(os.environ["FASTGEN_INCEPTION_WEIGHTS"]))
    else:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise ModelLoadError(
        f"InceptionV3 weights for FID not found (looked at {', '.join(map(str, candidates))}). Expected the file "
        f"{INCEPTION_WEIGHTS_FILE}: {INCEPTION_WEIGHTS_SOURCE}. Download it on a machine with internet and pass "
        f"--inception-weights PATH (or set FASTGEN_INCEPTION_WEIGHTS); fastgen never downloads at evaluation time."
    )


class InceptionFeatures(nn.Module):
    """The standard FID InceptionV3 (2048-d pool features) as torchmetrics builds it, weights from a local file.

    The file is read with ``weights_only=True`` (or safetensors), then handed to torch-fidelity as a
    temporary file this process wrote from plain tensors, so no foreign pickle is ever executed.
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None = None, antialias: bool = True):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as e:  # pragma: no cover - torchmetrics is a dependency
            raise ModelLoadError("FID needs torchmetrics: pip install 'fastgen[eval]'") from e
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModelLoadError("the InceptionV3 FID backend needs torch-fidelity: pip install 'fastgen[eval]'")
        self.weights_path = find_inception_weights(weights)
        state = load_weights_file(self.weights_path, "InceptionV3")
        self.weights_sha256 = _sha256_file(self.weights_path)
        self.antialias = antialias
        with tempfile.TemporaryDirectory() as tmp:
            safe = Path(tmp) / "inception.pth"
            torch.save(state, safe)
            try:
                self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                              feature_extractor_weights_path=str(safe), antialias=antialias)
            except RuntimeError as e:  # strict load_state_dict: wrong keys or shapes
                raise ModelLoadError(f"{self.weights_path} is not an InceptionV3 FID checkpoint "
                                     f"({str(e).splitlines()[0]}); expected {INCEPTION_WEIGHTS_FILE}") from e

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.to(torch.uint8)).reshape(len(images), -1)

    def describe(self) -> dict:
        import torchmetrics

        return {"backend": "torchmetrics-inception", "feature_dims": 2048, "weights": self.weights_path.name,
                "weights_sha256_16": self.weights_sha256[:16], "antialias": self.antialias,
                "internal_resize": "bilinear to 299 (antialiased)" if self.antialias else "TF1-style bilinear to 299",
                "torchmetrics": torchmetrics.__version__}


class ModuleFeatures(nn.Module):
    """Any feature extractor as a FID backend: ``module(float images in [0,1])`` -> features or a tuple
    whose ``output_index`` item is the features (the digits classifier returns (digits, colours, feats))."""

    def __init__(self, module: nn.Module, name: str, num_features: int, output_index: int | None = None):
        super().__init__()
        self.module = module.eval()
        self.name = name
        self.num_features = int(num_features)
        self.output_index = output_index

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(images.float() / 255.0)
        if self.output_index is not None:
            out = out[self.output_index]
        return out.reshape(len(images), -1)

    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.module.parameters())
        digest = hashlib.sha256()
        for k, v in sorted(self.module.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        import torchmetrics

        return {"backend": f"torchmetrics-custom:{self.name}", "feature_dims": self.num_features,
                "weights_sha256_16": digest.hexdigest()[:16], "parameters": n_params,
                "torchmetrics": torchmetrics.__version__}


def digits_backend(classifier=None) -> ModuleFeatures:
    """The digits classifier's 64-d penultimate features (it area-resizes its input to 32 px itself)."""
    if classifier is None:
        from fastgen.zoo import paths

        classifier = paths.load_classifier()
    dims = getattr(classifier, "num_features", None)
    if dims is None:  # any (digits, colours, features) module: probe once for the feature size
        with torch.no_grad():
            dims = classifier(torch.zeros(1, 3, 32, 32))[2].shape[-1]
    return ModuleFeatures(classifier, "digits-classifier", int(dims), output_index=2)


# --------------------------------------------------------------------------------------------
# Reference (real) image sources and the statistics cache.


class ReferenceSource(Protocol):
    def identity(self) -> str: ...

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...


class TensorReference:
    """Real images already in memory (uint8 or [0,1] floats), named for the cache."""

    def __init__(self, name: str, images: torch.Tensor):
        self.name, self.images = name, images

    def identity(self) -> str:
        digest = hashlib.sha256(quantize_uint8(self.images).numpy().tobytes()).hexdigest()[:16]
        return f"tensor:{self.name}:{tuple(self.images.shape)}:{digest}"

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.images), batch_size):
            yield quantize_uint8(self.images[i : i + batch_size])


class DigitsReference(TensorReference):
    """The digits world's held-out split at ``resolution`` (every digit, every colour)."""

    def __init__(self, split: str = "test", resolution: int = 32):
        from fastgen.data.digits import DigitsDataset

        pixels, _, _ = DigitsDataset(split).all_pixels(resolution)
        super().__init__(f"digits-{split}@{resolution}", pixels)

    def identity(self) -> str:  # the rendering is deterministic; hash it anyway so a change shows
        return super().identity()


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: Path) -> torch.Tensor:
    """One image file as uint8 [3,H,W]; a corrupt file is an error naming it."""
    from PIL import UnidentifiedImageError

    try:
        arr = np.asarray(decode_image(path))  # every mode to 8-bit RGB (16-bit grey, palette, alpha, CMYK)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class FolderReference:
    """Real images from a folder (recursively), optionally a fixed list of files (a preset's subset)."""

    def __init__(self, folder: str | os.PathLike, files: list[Path] | None = None):
        self.folder = Path(folder)
        self.files = list(files) if files is not None else list_images(self.folder)

    def identity(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.folder) if f.is_relative_to(self.folder) else f}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        return f"folder:{self.folder.resolve()}:{len(self.files)}:{h.hexdigest()[:16]}"

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.files), batch_size):
            imgs = [read_image(f) for f in self.files[i : i + batch_size]]
            yield imgs  # type: ignore[misc] - sizes may differ; FID.preprocess stacks after resizing


def default_cache_dir() -> Path:
    root = os.environ.get("FASTGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastgen")
    return Path(root) / "fid_stats"


def stats_key(reference: ReferenceSource, preprocess: Preprocess, backend) -> tuple[str, dict]:
    meta = {"dataset": reference.identity(), "preprocess": preprocess.describe(), "backend": backend.describe()}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20], meta


# --------------------------------------------------------------------------------------------


class FID:
    """FID of generated images against one cached reference, under one recorded protocol.

    >>> fid = FID(digits_backend(), Preprocess(resolution=32, resize_filter="box"))
    >>> fid.set_reference(DigitsReference("test"))
    >>> fid.score(images)          # images in [0,1] (quantised to 8 bits first) or uint8
    """

    def __init__(self, backend, preprocess: Preprocess | None = None, cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 250, use_cache: bool = True):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.backend = backend
        self.preprocess = preprocess or Preprocess()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.metric = FrechetInceptionDistance(feature=backend, reset_real_features=False)
        self.reference_meta: dict | None = None
        self.cache_path: Path | None = None
        self.cache_hit: bool | None = None

    # -- reference statistics ------------------------------------------------------------
    def _prep(self, batch) -> torch.Tensor:
        if isinstance(batch, list):  # images of different sizes: preprocess each, then stack
            out = [self.preprocess(b[None]) for b in batch]
            shapes = {tuple(o.shape[1:]) for o in out}
            if len(shapes) > 1:
                raise DataError(f"images of different sizes {sorted(shapes)} after preprocessing; "
                                f"set a FID resolution so they are resized to one size")
            return torch.cat(out)
        return self.preprocess(batch)

    def set_reference(self, reference: ReferenceSource) -> "FID":
        key, meta = stats_key(reference, self.preprocess, self.backend)
        path = self.cache_dir / f"{key}.npz"
        self.cache_path, self.reference_meta = path, meta
        m = self.metric
        if self.use_cache and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    m.real_features_sum = torch.from_numpy(z["sum"]).double()
                    m.real_features_cov_sum = torch.from_numpy(z["cov_sum"]).double()
                    m.real_features_num_samples = torch.tensor(int(z["n"]))
                self.cache_hit = True
                return self
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache entry: recompute and overwrite it
        m.real_features_sum.zero_()
        m.real_features_cov_sum.zero_()
        m.real_features_num_samples.zero_()
        for batch in reference.batches(self.batch_size):
            m.update(self._prep(batch), real=True)
        if int(m.real_features_num_samples) < 2:
            raise DataError("the FID reference needs at least 2 images")
        self.cache_hit = False
        if self.use_cache:
            self._write_cache(path, meta)
        return self

    def _write_cache(self, path: Path, meta: dict) -> None:
        m = self.metric
        buf = io.BytesIO()
        np.savez(buf, sum=m.real_features_sum.numpy(), cov_sum=m.real_features_cov_sum.numpy(),
                 n=np.array(int(m.real_features_num_samples)), meta=np.array(json.dumps(meta)))
        atomic_write_bytes(path, buf.getvalue())

    @property
    def reference_count(self) -> int:
        return int(self.metric.real_features_num_samples)

    # -- scoring ---------------------------------------------------------------------------
    def score(self, images: torch.Tensor | Iterable) -> float:
        """FID of ``images`` ([N,3,H,W] float in [0,1] or uint8, or an iterable of such batches)."""
        if self.reference_meta is None:
            raise ConfigError("FID.score called before set_reference(...)")
        m = self.metric
        m.fake_features_sum.zero_()
        m.fake_features_cov_sum.zero_()
        m.fake_features_num_samples.zero_()
        batches = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)] \
            if isinstance(images, torch.Tensor) else images
        for b in batches:
            m.update(self._prep(b), real=False)
        if int(m.fake_features_num_samples) < 2:
            raise DataError("FID needs at least 2 generated images")
        return float(m.compute())

    def describe(self) -> dict:
        """The protocol to record next to every number this object produces."""
        return {**self.backend.describe(), "preprocess": self.preprocess.describe(),
                "quantisation": "round to 8 bits (PNG-equivalent) before preprocessing",
                "reference": (self.reference_meta or {}).get("dataset"),
                "reference_images": self.reference_count,
                "stats_cache": f"$FASTGEN_CACHE/fid_stats/{self.cache_path.name}" if self.cache_path else None,
                "distance": "torchmetrics FrechetInceptionDistance (float64)"}
