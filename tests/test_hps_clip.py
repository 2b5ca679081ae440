"""HPSv2 and CLIP-score metrics on tiny random-weight open_clip / transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.evaluation.clip_score import HFCLIPScorer, OpenClipScorer
from fastgen.evaluation.hps import (
    HPS_MEAN,
    HPS_STD,
    HPS_STYLES,
    HPS_VERSIONS,
    HPSScorer,
    find_hps_checkpoint,
    hps_benchmark,
    hps_preprocess,
    hps_preprocess_pil,
    load_benchmark_prompts,
)
from tiny_models import pattern_card, random_images, tiny_open_clip_configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_HPS = "fastgen-tiny-hps"
TINY_CLIP = "fastgen-tiny-clip"
PROMPTS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon", "a blue car"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_configs():
    with tiny_open_clip_configs(TINY_HPS, TINY_CLIP):
        yield


@pytest.fixture(scope="module")
def hps_model():
    torch.manual_seed(0)
    return open_clip.create_model(TINY_HPS, pretrained=None).eval()


@pytest.fixture(scope="module")
def hps_ckpt(hps_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hps") / HPS_VERSIONS["v2.1"]
    torch.save({"state_dict": hps_model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def hps_scorer(hps_ckpt) -> HPSScorer:
    return HPSScorer.from_checkpoint(hps_ckpt, model_name=TINY_HPS)


def _pattern(width: int, height: int) -> Image.Image:
    return pattern_card(width, height, checker=16)


def _images(n: int, height: int = 40, width: int = 56) -> torch.Tensor:
    return random_images(n, height, width)


def _reference_cosine(model, images: torch.Tensor, prompts: list[str], model_name: str = TINY_HPS) -> torch.Tensor:
    tokens = open_clip.get_tokenizer(model_name)(prompts)
    with torch.no_grad():
        img = model.encode_image(hps_preprocess(images), normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    return torch.diagonal(img @ txt.T)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(300, 200), (301, 200), (303, 200), (200, 333)])
def test_preprocess_matches_reference_eval_transform(tmp_path, size):
    # 301 and 303 wide: the crop offset is 56.5 and 57.5 (torchvision rounds half to even)
    _pattern(*size).save(tmp_path / "card.png")
    img = Image.open(tmp_path / "card.png")
    reference = Compose(
        [
            ToTensor(),
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            Normalize(HPS_MEAN, HPS_STD),
        ]
    )(img)
    assert reference.shape == (3, 224, 224)
    batched = hps_preprocess(ToTensor()(img)[None])
    assert batched.shape == (1, 3, 224, 224)
    torch.testing.assert_close(batched[0], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(hps_preprocess_pil(img), reference, atol=1e-5, rtol=0)


def test_preprocess_arithmetic_without_torchvision():
    # uniform colour: the output is (c/255 - mean) / std everywhere
    colour = (200, 100, 30)
    img = Image.new("RGB", (50, 40), colour)
    out = hps_preprocess_pil(img)
    for ch in range(3):
        expected = (colour[ch] / 255 - HPS_MEAN[ch]) / HPS_STD[ch]
        assert torch.allclose(out[ch], torch.full((224, 224), expected), atol=1e-5)
    # shortest edge already 224: no resize, the crop takes rows 38..261 of 300 (round(76 / 2) = 38)
    arr = np.asarray(_pattern(224, 300), dtype=np.float64) / 255
    out = hps_preprocess_pil(_pattern(224, 300)).double()
    expected = (arr[38:262] - np.array(HPS_MEAN)) / np.array(HPS_STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_preprocess_pil_converts_rgba_and_grayscale():
    rgb = _pattern(120, 90)
    rgba = rgb.copy()
    rgba.putalpha(77)
    out = hps_preprocess_pil(rgba)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, hps_preprocess_pil(rgb))
    gray = hps_preprocess_pil(rgb.convert("L"))
    assert gray.shape == (3, 224, 224)
    # the three channels carry the same grey level, normalised with their own mean/std
    grey0 = gray[0] * HPS_STD[0] + HPS_MEAN[0]
    for ch in (1, 2):
        torch.testing.assert_close(gray[ch] * HPS_STD[ch] + HPS_MEAN[ch], grey0, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("layout", ["state_dict", "bare", "safetensors"])
def test_checkpoint_round_trip(hps_model, tmp_path, layout):
    sd = hps_model.state_dict()
    if layout == "state_dict":
        path = tmp_path / HPS_VERSIONS["v2.1"]
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif layout == "bare":
        path = tmp_path / "bare_weights.pt"
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "HPS_v2.1_compressed.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    scorer = HPSScorer.from_checkpoint(path, model_name=TINY_HPS)
    images = _images(3)
    scores = scorer(images, PROMPTS)
    torch.testing.assert_close(scores, _reference_cosine(hps_model, images, PROMPTS), atol=1e-6, rtol=0)
    assert scores.shape == (3,) and bool(((scores >= -1) & (scores <= 1)).all())
    info = scorer.describe()
    assert info["version"] == "v2.1" and info["checkpoint"] == path.name and info["metric"] == "hps"
    assert "x100" in info["convention"]


def test_checkpoint_found_in_folder_and_hps_root(hps_ckpt, monkeypatch, tmp_path):
    assert find_hps_checkpoint("v2.1", hps_ckpt.parent) == hps_ckpt
    monkeypatch.setenv("HPS_ROOT", str(hps_ckpt.parent))
    assert find_hps_checkpoint("v2.1") == hps_ckpt
    v20 = tmp_path / HPS_VERSIONS["v2.0"]
    v20.write_bytes(b"")
    with pytest.raises(ConfigError, match="v2.0"):
        find_hps_checkpoint("v2.1", v20)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_strict_keys(hps_model, tmp_path, change):
    sd = dict(hps_model.state_dict())
    if change == "missing":
        key = "text_projection"
        del sd[key]
    else:
        key = "visual.extra_head.weight"
        sd[key] = torch.zeros(2)
    path = tmp_path / HPS_VERSIONS["v2.1"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ModelLoadError, match="does not match the model config") as err:
        HPSScorer.from_checkpoint(path, model_name=TINY_HPS)
    assert key in str(err.value)


def test_missing_checkpoint_and_unknown_version(monkeypatch, tmp_path):
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        find_hps_checkpoint("v2.1")
    msg = str(err.value)
    assert "HPS_v2.1_compressed.pt" in msg and "xswu/HPSv2" in msg and str(tmp_path) in msg
    with pytest.raises(ModelLoadError, match="HPS_v2_compressed.pt"):
        HPSScorer.from_checkpoint(tmp_path / "nowhere.pt", version="v2.0", model_name=TINY_HPS)
    with pytest.raises(ConfigError, match="v2.0, v2.1"):
        find_hps_checkpoint("v3")


# --------------------------------------------------------------------------- scorer behaviour


def test_gradients_reach_images(hps_scorer):
    images = _images(2).requires_grad_(True)
    score = hps_scorer(images, PROMPTS[:2])
    score.sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in hps_scorer.parameters())


def test_prompt_count_must_match(hps_scorer):
    with pytest.raises(DataError, match="3 prompts"):
        hps_scorer(_images(2), PROMPTS)


def test_text_features_are_cached(hps_ckpt, monkeypatch):
    scorer = HPSScorer.from_checkpoint(hps_ckpt, model_name=TINY_HPS)
    calls: list[int] = []
    original = scorer.model.encode_text

    def counting(tokens, normalize=False):
        calls.append(tokens.shape[0])
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(scorer.model, "encode_text", counting)
    first = scorer.encode_text(["a cat", "a cat"])
    assert calls == [1]
    torch.testing.assert_close(first[0], first[1])
    again = scorer.encode_text(["a dog", "a cat"])
    assert calls == [1, 1]
    torch.testing.assert_close(again[1], first[0])
    torch.testing.assert_close(again.norm(dim=-1), torch.ones(2))


# --------------------------------------------------------------------------- benchmark protocol


PER_STYLE = 20


def _write_layout(root: Path) -> tuple[Path, Path]:
    prompts_dir, images_root = root / "prompts", root / "images"
    prompts_dir.mkdir()
    words = ["cat", "dog", "horse", "car", "beach", "moon", "fruit", "man"]
    for s, style in enumerate(HPS_STYLES):
        prompts = [f"{style} {words[(i + s) % len(words)]} number {i}" for i in range(PER_STYLE)]
        (prompts_dir / f"{style}.json").write_text(json.dumps(prompts))
        folder = images_root / style
        folder.mkdir(parents=True)
        for i in range(PER_STYLE):
            _pattern(48 + 4 * i, 40 + s * 6).rotate(15 * i + 40 * s).save(folder / f"{i:05d}.jpg", quality=90)
    return prompts_dir, images_root


def test_benchmark_protocol(hps_scorer, tmp_path):
    prompts_dir, images_root = _write_layout(tmp_path)
    result = hps_benchmark(hps_scorer, images_root, prompts_dir, per_style=PER_STYLE, batch_size=7)
    prompts = load_benchmark_prompts(prompts_dir, per_style=PER_STYLE)
    assert result["version"] == "v2.1" and result["convention"] == "x100"
    everything = []
    for style in HPS_STYLES:
        with torch.no_grad():
            direct = torch.cat(
                [
                    hps_scorer(ToTensor()(Image.open(images_root / style / f"{i:05d}.jpg"))[None], [prompts[style][i]])
                    for i in range(PER_STYLE)
                ]
            ).double().numpy() * 100
        stats = result["styles"][style]
        assert stats["n"] == PER_STYLE
        assert stats["mean"] == pytest.approx(direct.mean(), abs=1e-4)
        chunk_means = direct.reshape(10, PER_STYLE // 10).mean(axis=1)
        assert stats["chunk_std"] == pytest.approx(np.std(chunk_means), abs=1e-4)
        everything.append(direct)
    assert result["average"] == pytest.approx(np.concatenate(everything).mean(), abs=1e-4)
    # different images/prompts really give different scores
    assert np.concatenate(everything).std() > 0


def test_benchmark_rejects_bad_layouts(hps_scorer, tmp_path):
    prompts_dir, images_root = _write_layout(tmp_path)
    with pytest.raises(DataError, match="has 20 prompts .* expected 19"):
        hps_benchmark(hps_scorer, images_root, prompts_dir, per_style=PER_STYLE - 1)

    missing = images_root / "paintings" / "00007.jpg"
    missing.rename(tmp_path / "aside.jpg")
    with pytest.raises(DataError, match="00007.jpg") as err:
        hps_benchmark(hps_scorer, images_root, prompts_dir, per_style=PER_STYLE)
    assert "1 missing" in str(err.value)
    (tmp_path / "aside.jpg").rename(missing)

    extra = images_root / "photo" / f"{PER_STYLE:05d}.jpg"
    _pattern(50, 50).save(extra)
    with pytest.raises(DataError, match="20 prompts but 21 images"):
        hps_benchmark(hps_scorer, images_root, prompts_dir, per_style=PER_STYLE)
    extra.unlink()

    corrupt = images_root / "anime" / "00003.jpg"
    corrupt.write_bytes(b"\x00garbage, not a jpeg" * 10)
    with pytest.raises(DataError, match="00003.jpg"):
        hps_benchmark(hps_scorer, images_root, prompts_dir, per_style=PER_STYLE)


# --------------------------------------------------------------------------- CLIP score


def _tiny_hf_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tiny_models import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    # Give both towers a shared component so that every cosine is positive: the per-image
    # clamp and torchmetrics' clamp of the mean then agree, and the comparison is exact.
    with torch.no_grad():
        shared = torch.randn(32)
        model.text_projection.weight.copy_(model.visual_projection.weight)
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.weight.mul_(0.3)
            norm.bias.copy_(shared)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def test_hf_clip_score_matches_torchmetrics(tmp_path):
    scorer = HFCLIPScorer.from_pretrained(_tiny_hf_clip(tmp_path / "clip"))
    images = _images(4, 48, 40)
    prompts = PROMPTS + ["a bowl of fruit on a wooden table"]
    raw = scorer.score(images, prompts, clamp=False)
    scores = scorer.score(images, prompts)
    assert scores.shape == (4,)
    assert bool((raw > 0).all()), "the tiny model is built so that every cosine is positive"
    assert bool(((scores >= 0) & (scores <= 100)).all()) and scores.std() > 0
    torch.testing.assert_close(scores, raw)
    assert scorer.torchmetrics_score(images, prompts) == pytest.approx(float(scores.mean()), abs=1e-4)
    # scores are per image: permuting the pairs permutes the scores
    order = [2, 0, 3, 1]
    torch.testing.assert_close(scorer.score(images[order], [prompts[i] for i in order]), scores[order])
    info = scorer.describe()
    assert info["metric"] == "clip_score" and "max(100 * cos" in info["convention"]


def test_hf_clip_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="openai/clip-vit-large-patch14"):
        HFCLIPScorer.from_pretrained(tmp_path / "absent")
    folder = _tiny_hf_clip(tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors") as err:
        HFCLIPScorer.from_pretrained(folder)
    assert "pytorch_model.bin" in str(err.value)


def test_open_clip_score_by_hand(tmp_path):
    torch.manual_seed(3)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    path = tmp_path / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    scorer = OpenClipScorer.from_checkpoint(TINY_CLIP, path)
    assert scorer.image_size == 64
    images = _images(3, 50, 70)
    with torch.no_grad():
        img = model.encode_image(hps_preprocess(images, 64))
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(PROMPTS))
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS, clamp=False), 100 * cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.score(images, PROMPTS), (100 * cos).clamp(min=0), atol=1e-4, rtol=0)
    assert scorer.describe()["backend"] == "open_clip"
    with pytest.raises(ModelLoadError, match="missing.pt"):
        OpenClipScorer.from_checkpoint(TINY_CLIP, tmp_path / "missing.pt")
