"""FID protocol: quantisation, preprocessing, the cached real statistics, the Inception backend's
offline weights and the COCO presets."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.evaluation.digits_metrics import feature_stats, frechet_distance
from fastgen.evaluation.fid import (
    FID,
    INCEPTION_WEIGHTS_FILE,
    FolderReference,
    InceptionFeatures,
    ModuleFeatures,
    Preprocess,
    TensorReference,
    quantize_uint8,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingNet(nn.Module):
    """A small fixed random feature extractor that counts the images it sees."""

    def __init__(self, dims: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(3 * 4 * 4, dims, generator=g), requires_grad=False)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fid(tmp_path, net=None, pre=None) -> FID:
    net = net or CountingNet()
    return FID(ModuleFeatures(net, "counting", 8), pre or Preprocess(), cache_dir=tmp_path / "cache", batch_size=16)


def test_quantisation_rounds_like_png_not_truncates():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 1.2, -0.1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    q = quantize_uint8(x)[0, 0, 0].tolist()
    assert q == [0, 0, 1, 255, 255, 0]  # truncation would give 0 for 0.6/255 and 254 for 254.6/255


def test_preprocess_crops_long_edge_and_resizes_with_the_named_pil_filter():
    from PIL import Image

    img = (torch.arange(3 * 20 * 40).reshape(1, 3, 20, 40) % 251).to(torch.uint8)
    out = Preprocess(10, "lanczos", center_crop=True)(img)
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy()).crop((10, 0, 30, 20)).resize((10, 10), Image.LANCZOS)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 10, 10)
    assert torch.equal(out[0], torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    assert not torch.equal(out, Preprocess(10, "bilinear")(img))
    assert torch.equal(Preprocess(None)(img), img)
    with pytest.raises(ConfigError, match="unknown resize filter 'cubic'"):
        Preprocess(10, "cubic")


def test_fid_matches_the_closed_form_on_the_same_features(tmp_path):
    net = CountingNet()
    fid = _fid(tmp_path, net).set_reference(TensorReference("ref", _images(64, seed=1)))
    fake = _images(48, seed=2) * 0.7
    got = fid.score(fake)
    feats = lambda x: net(quantize_uint8(x)).double().numpy()  # noqa: E731 - ModuleFeatures divides by 255 inside
    ref_f = ModuleFeatures(net, "c", 8)(quantize_uint8(_images(64, seed=1))).double().numpy()
    fake_f = ModuleFeatures(net, "c", 8)(quantize_uint8(fake)).double().numpy()
    want = frechet_distance(*feature_stats(fake_f), *feature_stats(ref_f))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert fid.score(_images(48, seed=1)) < got  # the reference itself is closer than darkened images
    del feats


def test_real_statistics_are_cached_and_reused(tmp_path):
    ref = TensorReference("ref", _images(64, seed=1))
    net1 = CountingNet()
    fid1 = _fid(tmp_path, net1).set_reference(ref)
    assert fid1.cache_hit is False and fid1.cache_path.is_file() and net1.seen >= 64
    net2 = CountingNet()
    fid2 = _fid(tmp_path, net2).set_reference(ref)
    assert fid2.cache_hit is True and net2.seen == 0  # no feature pass over the real images
    fake = _images(32, seed=3)
    assert fid2.score(fake) == pytest.approx(fid1.score(fake), rel=1e-9)
    meta = json.loads(str(np.load(fid2.cache_path)["meta"]))
    assert meta["preprocess"]["resize_filter"] == "bicubic" and meta["backend"]["backend"] == "torchmetrics-custom:counting"


@pytest.mark.parametrize("change", ["resolution", "filter", "weights", "data"])
def test_cache_is_invalidated_when_preprocessing_backend_or_data_change(tmp_path, change):
    ref = TensorReference("ref", _images(64, seed=1))
    base = _fid(tmp_path, CountingNet(), Preprocess(8, "bicubic")).set_reference(ref)
    pre, net, ref2 = Preprocess(8, "bicubic"), CountingNet(), ref
    if change == "resolution":
        pre = Preprocess(12, "bicubic")
    elif change == "filter":
        pre = Preprocess(8, "lanczos")
    elif change == "weights":
        net = CountingNet(seed=1)
    else:
        imgs = _images(64, seed=1)
        imgs[0, 0, 0, 0] = 1 - imgs[0, 0, 0, 0]
        ref2 = TensorReference("ref", imgs)
    other = _fid(tmp_path, net, pre).set_reference(ref2)
    assert other.cache_hit is False and other.cache_path != base.cache_path and net.seen >= 64


def test_fid_needs_a_reference_and_two_images(tmp_path):
    fid = _fid(tmp_path)
    with pytest.raises(ConfigError, match="set_reference"):
        fid.score(_images(4))
    fid.set_reference(TensorReference("ref", _images(8)))
    with pytest.raises(DataError, match="at least 2"):
        fid.score(_images(1))


def _write_png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_reference_reads_images_and_names_a_corrupt_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        _write_png(tmp_path / "real" / f"{i:03d}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    fid = _fid(tmp_path, pre=Preprocess(16, "bicubic")).set_reference(FolderReference(tmp_path / "real"))
    assert fid.reference_count == 6
    (tmp_path / "real" / "003.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="003.png"):
        _fid(tmp_path, pre=Preprocess(16, "lanczos")).set_reference(FolderReference(tmp_path / "real"))
    with pytest.raises(DataError, match="does not exist"):
        FolderReference(tmp_path / "nope")


# -- InceptionV3 from a local file -------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights in the layout of the standard FID InceptionV3 (the real file cannot be downloaded here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    net = fe.FeatureExtractorInceptionV3("probe", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_backend_loads_local_weights_without_unpickling_code(inception_file):
    feats = InceptionFeatures(inception_file, antialias=False)
    out = feats(quantize_uint8(_images(3, size=40)))
    assert out.shape == (3, 2048) and torch.isfinite(out).all()
    d = feats.describe()
    assert d["weights"] == INCEPTION_WEIGHTS_FILE and d["antialias"] is False and d["torchmetrics"]
    # same weights through a folder path, antialias changes the recorded protocol (and the cache key)
    assert InceptionFeatures(inception_file.parent).describe()["antialias"] is True


def test_inception_weights_errors(tmp_path, inception_file, monkeypatch):
    monkeypatch.delenv("FASTGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ModelLoadError, match=INCEPTION_WEIGHTS_FILE) as e:
        InceptionFeatures(tmp_path / "missing.pth")
    assert "torch-fidelity" in str(e.value) and "--inception-weights" in str(e.value)
    with pytest.raises(ModelLoadError, match=INCEPTION_WEIGHTS_FILE):
        InceptionFeatures(None)  # nothing in $TORCH_HOME either

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ModelLoadError, match="plain tensors"):
        InceptionFeatures(bad)
    sd = torch.load(inception_file, weights_only=True)
    sd.pop(next(iter(sd)))
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ModelLoadError, match="not an InceptionV3 FID checkpoint"):
        InceptionFeatures(tmp_path / "partial.pth")


# -- presets -----------------------------------------------------------------------------------


def _fake_coco(root, n_images: int = 10, split: str = "val2017"):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        _write_png((root / split / name).with_suffix(".jpg"), rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        images.append({"id": 100 + i, "file_name": name})
        anns += [{"image_id": 100 + i, "caption": f"image {i} caption {k}"} for k in range(3)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))


def test_coco_preset_reads_local_files_deterministically(tmp_path, monkeypatch):
    from dataclasses import replace

    from fastgen.evaluation import presets

    _fake_coco(tmp_path)
    with pytest.raises(DataError, match="needs 5000 captioned images"):
        presets.load_preset("coco2017-5k@512", tmp_path)
    monkeypatch.setitem(presets.PRESETS, "coco2017-5k@512", replace(presets.PRESETS["coco2017-5k@512"], num_pairs=8))
    a = presets.load_preset("coco2017-5k@512", tmp_path)
    b = presets.load_preset("coco2017-5k@512", tmp_path)
    assert a.prompts == b.prompts and a.files == b.files and len(a.prompts) == 8
    for p, f in zip(a.prompts, a.files):  # each prompt is one of its own image's captions
        assert p.startswith(f"image {int(f.stem) % 1000} caption")
    assert a.preprocess == Preprocess(512, "bicubic", True) and a.protocol["prompts_sha256_16"]
    assert len(presets.load_preset("coco2017-5k@512", tmp_path, limit=3).prompts) == 3
    (a.files[2]).unlink()
    with pytest.raises(DataError, match="missing"):
        presets.load_preset("coco2017-5k@512", tmp_path)
    with pytest.raises(DataError, match="captions_val2014.json"):
        presets.load_preset("coco2014-30k@256", tmp_path)
    with pytest.raises(ConfigError, match="coco2014-30k@256"):
        presets.load_preset("coco-nope", tmp_path)


def test_prompt_file_and_image_folder_must_agree_in_count(tmp_path):
    from fastgen.evaluation.presets import load_paired_folder

    for i in range(3):
        _write_png(tmp_path / "imgs" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "p.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="2 prompts but .* 3 images"):
        load_paired_folder(tmp_path / "p.txt", tmp_path / "imgs")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    assert load_paired_folder(tmp_path / "p.txt", tmp_path / "imgs").prompts == ["a", "b", "c"]


@pytest.mark.slow
@pytest.mark.ci
def test_digits_fid_is_stable_across_seeds():
    """The shipped UNet teacher scored twice with different noise seeds: digits-FID within 10%."""
    from fastgen.data import digits as dw
    from fastgen.evaluation.bench import load_pipeline_for_bench, sample_pipeline
    from fastgen.evaluation.digits_metrics import DigitsEvaluator
    from fastgen.zoo import paths

    ev = DigitsEvaluator(paths.load_classifier())
    pipe = load_pipeline_for_bench(paths.sd_teacher())
    fids = []
    for seed in (0, 1):
        prompts, d, c = dw.eval_prompts(500, seed=seed)
        images = sample_pipeline(pipe, prompts, 10, 3.0, seed=1000 * seed, height=32)
        fids.append(ev.score(images, d, c).digits_fid)
    print(f"digits-FID seed 0: {fids[0]:.3f}, seed 1: {fids[1]:.3f}, relative difference {abs(fids[0] - fids[1]) / min(fids):.4f}")
    assert abs(fids[0] - fids[1]) / min(fids) < 0.10, fids
