"""Expert rewards (hpsv2, pickscore, clip) on tiny random-weight open_clip / transformers models."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from fastgen.errors import DataError, ModelLoadError
from fastgen.evaluation.hps import HPS_MEAN, HPS_STD, HPS_VERSIONS
from fastgen.rewards import REWARDS, WeightedReward, load_reward
from fastgen.rewards.experts import CLIPReward, HPSReward, PickScoreReward, ProcessorImageTransform
from tiny_models import pattern_card, random_images, tiny_open_clip_configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_HPS = "fastgen-tiny-reward-hps"
TINY_CLIP = "fastgen-tiny-reward-clip"
PROMPTS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon", "a blue car"]
# Deliberately not the OpenAI CLIP statistics: the PickScore transform must read them from the processor.
PICK_MEAN, PICK_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PICK_SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def _tiny_configs():
    with tiny_open_clip_configs(TINY_HPS, TINY_CLIP):
        yield


def _open_clip_model(name: str, seed: int):
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.fixture(scope="module")
def hps_model():
    return _open_clip_model(TINY_HPS, 0)


@pytest.fixture(scope="module")
def hps_ckpt(hps_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hps") / HPS_VERSIONS["v2.1"]
    torch.save({"state_dict": hps_model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def clip_model():
    return _open_clip_model(TINY_CLIP, 1)


@pytest.fixture(scope="module")
def clip_ckpt(clip_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.pt"
    torch.save(clip_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pick_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, processor folder) of a tiny CLIPModel and CLIPProcessor, saved separately like
    PickScore_v1 and the laion CLIP-H processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tiny_models import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=PICK_SIZE, patch_size=8)
    torch.manual_seed(2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": PICK_SIZE}, crop_size={"height": PICK_SIZE, "width": PICK_SIZE},
            image_mean=list(PICK_MEAN), image_std=list(PICK_STD),
        ),
        tokenizer=tok,
    )
    root = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(str(root / "PickScore_v1"))
    processor.save_pretrained(str(root / "processor"))
    return root / "PickScore_v1", root / "processor"


@pytest.fixture(scope="module")
def hps_reward(hps_ckpt) -> HPSReward:
    return HPSReward(hps_ckpt, model_name=TINY_HPS)


@pytest.fixture(scope="module")
def clip_reward(clip_ckpt) -> CLIPReward:
    return CLIPReward(TINY_CLIP, clip_ckpt)


@pytest.fixture(scope="module")
def pick_reward(pick_folders) -> PickScoreReward:
    model, processor = pick_folders
    return PickScoreReward(model, processor)


def _pattern(width: int, height: int) -> Image.Image:
    return pattern_card(width, height, checker=8)


def _images(n: int, height: int = 30, width: int = 45) -> torch.Tensor:
    return random_images(n, height, width)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


# --------------------------------------------------------------------------- preprocessing


# 45x30 -> 48x32: crop offset 8; 48x30 -> 51x32: offset 9.5, which the processor floors to 9
# (torchvision's CenterCrop would round it to 10); 30x45: portrait.
@pytest.mark.parametrize("size", [(45, 30), (48, 30), (30, 45)])
def test_pickscore_preprocess_matches_processor(pick_reward, size):
    img = _pattern(*size)
    x = ToTensor()(img)[None]
    ours = pick_reward.preprocess(x)
    assert ours.shape == (1, 3, PICK_SIZE, PICK_SIZE)
    assert pick_reward.transform.mean == PICK_MEAN and pick_reward.transform.std == PICK_STD
    # The processor resizes PIL images as uint8: width pass then height pass, each clamped to
    # [0,255] and rounded.  The tensor path clamps the same way but does not round (that would
    # zero the gradients), which leaves at most about one grey level: 1.5 / 255 / min(std).
    reference = pick_reward.processor(images=img, return_tensors="pt").pixel_values
    assert reference.shape == ours.shape
    tol = 1.5 / 255 / min(PICK_STD)
    assert float((ours - reference).abs().max()) <= tol
    # Float images with do_rescale=False take the processor's float path: identical arithmetic.
    float_ref = pick_reward.processor(images=x, do_rescale=False, return_tensors="pt").pixel_values
    float_ours = ProcessorImageTransform(pick_reward.processor.image_processor, emulate_uint8=False)(x)
    torch.testing.assert_close(float_ours, float_ref, atol=1e-5, rtol=0)


def test_pickscore_preprocess_uint8_emulation_matters(pick_reward):
    # Sharp wrapping ramps make bicubic upsampling overshoot: without the per-pass clamps the tensor
    # path would be tens of grey levels away from the processor's output.
    img = _pattern(45, 30)
    x = ToTensor()(img)[None]
    reference = pick_reward.processor(images=img, return_tensors="pt").pixel_values
    unclamped = ProcessorImageTransform(pick_reward.processor.image_processor, emulate_uint8=False)(x)
    assert float((unclamped - reference).abs().max()) > 10 / 255 / min(PICK_STD)


def _torchvision_reference(size: int):
    return Compose([ToTensor(), Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    Normalize(HPS_MEAN, HPS_STD)])


@pytest.mark.parametrize("size", [(45, 30), (48, 30), (30, 45)])
def test_open_clip_preprocess_matches_torchvision(hps_reward, clip_reward, size):
    img = _pattern(*size)
    x = ToTensor()(img)[None]
    torch.testing.assert_close(hps_reward.preprocess(x)[0], _torchvision_reference(224)(img), atol=1e-5, rtol=0)
    assert clip_reward.image_size == 64
    torch.testing.assert_close(clip_reward.preprocess(x)[0], _torchvision_reference(64)(img), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- values and gradients


def test_hps_reward_by_hand(hps_reward, hps_model):
    images = _images(3)
    with torch.no_grad():
        img = hps_model.encode_image(_torchvision_batch(images, 224))
        txt = hps_model.encode_text(open_clip.get_tokenizer(TINY_HPS)(PROMPTS))
    torch.testing.assert_close(hps_reward(images, PROMPTS), _cos(img, txt), atol=1e-5, rtol=0)
    assert hps_reward.preference_scale() == pytest.approx(float(hps_model.logit_scale.detach().exp()))


def test_clip_reward_by_hand(clip_reward, clip_model):
    images = _images(3, 50, 70)
    with torch.no_grad():
        img = clip_model.encode_image(_torchvision_batch(images, 64))
        txt = clip_model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(PROMPTS))
    torch.testing.assert_close(clip_reward(images, PROMPTS), _cos(img, txt), atol=1e-5, rtol=0)
    assert clip_reward.preference_scale() == pytest.approx(float(clip_model.logit_scale.detach().exp()))


def _torchvision_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    tf = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), Normalize(HPS_MEAN, HPS_STD)])
    return torch.stack([tf(im) for im in images])


def test_pickscore_reward_by_hand(pick_reward, pick_folders):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(pick_folders[0]), local_files_only=True).eval()
    images = _images(3)
    text = pick_reward.processor(text=PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert text["input_ids"].shape == (3, 77)
    with torch.no_grad():
        # the model's own forward, fed the processor's float-path pixels
        pixels = pick_reward.processor(images=images, do_rescale=False, return_tensors="pt").pixel_values
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    expected = _cos(out.image_embeds, out.text_embeds)
    # the published PickScore is logit_scale.exp() * cosine, i.e. the diagonal of logits_per_image
    scale = float(model.logit_scale.detach().exp())
    torch.testing.assert_close(torch.diagonal(out.logits_per_image), scale * expected, atol=1e-4, rtol=1e-5)
    assert pick_reward.preference_scale() == pytest.approx(scale)
    float_reward = PickScoreReward(*pick_folders, emulate_uint8=False)
    torch.testing.assert_close(float_reward(images, PROMPTS), expected, atol=1e-5, rtol=0)
    # default (uint8-style) preprocessing: same model, pixels from the reward's own transform
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=pick_reward.preprocess(images))
    torch.testing.assert_close(pick_reward(images, PROMPTS), _cos(out.image_embeds, out.text_embeds), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["hps", "clip", "pick"])
def test_gradients_reach_images(which, hps_reward, clip_reward, pick_reward):
    reward = {"hps": hps_reward, "clip": clip_reward, "pick": pick_reward}[which]
    images = _images(2, 40, 56).requires_grad_(True)
    values = reward(images, PROMPTS[:2])
    assert values.shape == (2,) and values.dtype == torch.float32
    values.sum().backward()
    assert images.grad is not None
    assert bool(torch.isfinite(images.grad).all()) and float(images.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())
    assert not reward.train().training


@pytest.mark.parametrize("which", ["hps", "clip", "pick"])
def test_prompt_count_and_describe(which, hps_reward, clip_reward, pick_reward):
    reward = {"hps": hps_reward, "clip": clip_reward, "pick": pick_reward}[which]
    with pytest.raises(DataError, match="one prompt per image"):
        reward(_images(3), PROMPTS[:2])
    info = reward.describe()
    assert info["reward"] == reward.name
    assert {"model", "checkpoint", "preprocessing", "definition"} <= set(info)
    assert "cosine similarity" in info["definition"] and "reward =" in info["definition"]
    expected_file = {"hps": HPS_VERSIONS["v2.1"], "clip": "open_clip_model.pt", "pick": "model.safetensors"}[which]
    assert info["checkpoint"] == expected_file


# --------------------------------------------------------------------------- text cache


def _count_text_calls(monkeypatch, module, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, method)

    def counting(*args, **kwargs):
        first = kwargs.get("input_ids", args[0] if args else None)
        calls.append(int(first.shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, method, counting)
    return calls


def test_text_features_cached(monkeypatch, hps_ckpt, clip_ckpt, pick_folders):
    images = _images(3)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    hps = HPSReward(hps_ckpt, model_name=TINY_HPS)
    clip = CLIPReward(TINY_CLIP, clip_ckpt)
    pick = PickScoreReward(*pick_folders)
    for reward, module, method in (
        (hps, hps.scorer.model, "encode_text"),
        (clip, clip.model, "encode_text"),
        (pick, pick.model, "get_text_features"),
    ):
        calls = _count_text_calls(monkeypatch, module, method)
        first = reward(images, prompts)
        assert calls == [2], f"{reward.name}: one batch with the two distinct prompts"
        second = reward(images, prompts)
        assert calls == [2], f"{reward.name}: cached prompts are not encoded again"
        torch.testing.assert_close(first, second)
        reward(images, [PROMPTS[2]] * 3)
        assert calls == [2, 1]


# --------------------------------------------------------------------------- registry and specs


def test_registered_and_loaded_from_specs(hps_ckpt, clip_ckpt, pick_folders, hps_reward, clip_reward, pick_reward):
    assert REWARDS["hpsv2"] is HPSReward and REWARDS["pickscore"] is PickScoreReward and REWARDS["clip"] is CLIPReward
    images = _images(2)
    prompts = PROMPTS[:2]
    hps = load_reward({"name": "hpsv2", "checkpoint": str(hps_ckpt), "model_name": TINY_HPS})
    pick = load_reward({"name": "pickscore", "model": str(pick_folders[0]), "processor": str(pick_folders[1])})
    assert isinstance(hps, HPSReward) and isinstance(pick, PickScoreReward)
    torch.testing.assert_close(hps(images, prompts), hps_reward(images, prompts))
    torch.testing.assert_close(pick(images, prompts), pick_reward(images, prompts))
    weighted = load_reward({"weighted": {
        "hpsv2": {"weight": 1.0, "checkpoint": str(hps_ckpt), "model_name": TINY_HPS},
        "clip": {"weight": 0.5, "model_name": TINY_CLIP, "checkpoint": str(clip_ckpt)},
    }})
    assert isinstance(weighted, WeightedReward)
    expected = hps_reward(images, prompts) + 0.5 * clip_reward(images, prompts)
    torch.testing.assert_close(weighted(images, prompts), expected)
    assert set(weighted.describe()["terms"]) == {"hpsv2", "clip"}


def test_string_spec_without_checkpoint_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"HPS_v2\.1_compressed\.pt"):
        load_reward("hpsv2")


# --------------------------------------------------------------------------- missing files


def test_missing_hps_and_clip_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match=r"HPS_v2\.1_compressed\.pt"):
        HPSReward(tmp_path / "absent", model_name=TINY_HPS)
    with pytest.raises(ModelLoadError, match="missing.pt"):
        CLIPReward(TINY_CLIP, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="checkpoint"):
        CLIPReward(TINY_CLIP, None)


def test_missing_pickscore_files(pick_folders, tmp_path):
    model, processor = pick_folders
    with pytest.raises(ModelLoadError, match="yuvalkirstain/PickScore_v1"):
        PickScoreReward(tmp_path / "absent", processor)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights / "config.json")
    with pytest.raises(ModelLoadError, match="model.safetensors") as err:
        PickScoreReward(no_weights, processor)
    assert "pytorch_model.bin" in str(err.value) and "save_pretrained" in str(err.value)
    no_config = tmp_path / "no_processor_config"
    shutil.copytree(processor, no_config)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (no_config / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="preprocessor_config.json") as err:
        PickScoreReward(model, no_config)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(err.value)
    # no processor given: the model folder holds none and the (test-local) hub cache is empty
    with pytest.raises(ModelLoadError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        PickScoreReward(model, None)
