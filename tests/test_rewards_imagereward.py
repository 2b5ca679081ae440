"""ImageReward on a tiny random-weight BLIP saved in the original checkpoint layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from fastgen.errors import DataError, ModelLoadError
from fastgen.rewards import REWARDS, load_reward
from fastgen.rewards.imagereward import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardModel,
    convert_imagereward_state_dict,
    imagereward_preprocess,
    imagereward_preprocess_pil,
    text_config_from_med,
    to_original_layout,
    vision_config_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a an the photo of cat dog red blue car on sofa horse astronaut riding moon sitting".split()
PROMPTS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon", "a blue car"]
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 64}
HEADS = {"num_attention_heads": 2}  # not derivable from weight shapes (the default is width / 64)


def _tiny_med(vocab_size: int) -> dict:
    # the shape of BLIP's med_config.json, shrunk; encoder_width is overridden by the visual width anyway
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
            "encoder_width": 32, "add_cross_attention": True}


def _randomise(model: torch.nn.Module) -> None:
    """Deterministic, well-scaled random weights (the HF init leaves the ViT embeddings ~1e-10)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower():
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif p.ndim == 2 and "embeddings" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif p.ndim == 4:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:  # word/position embeddings, class token, position embedding
                p.copy_(0.5 * noise)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert-tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return d


@pytest.fixture(scope="module")
def med(tok_dir) -> dict:
    n = len((tok_dir / "vocab.txt").read_text().split())
    return _tiny_med(n + 2)  # + [DEC] and [ENC], like 30522 + 2 = 30524


@pytest.fixture(scope="module")
def tiny(tok_dir, med) -> ImageRewardModel:
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(tok_dir))
    vcfg = vision_config_for(**TINY_VISION)
    model = ImageRewardModel(vcfg, text_config_from_med(med, vcfg.hidden_size, tok), tok)
    _randomise(model)
    return model


def _original_sd(model: ImageRewardModel) -> dict:
    """The model's weights as THUDM's ImageReward module would save them, unused keys included."""
    sd = to_original_layout({k: v.clone() for k, v in model.state_dict().items()})
    d = model.text.config.hidden_size
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = torch.randn(256, 32), torch.zeros(256)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = torch.randn(256, d), torch.zeros(256)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)
    return sd


def _write(folder: Path, sd: dict, med: dict, name: str = "ImageReward.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
    else:
        torch.save(sd, folder / name)
    (folder / "med_config.json").write_text(json.dumps(med))
    return folder


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny, med) -> Path:
    return _write(tmp_path_factory.mktemp("imagereward"), _original_sd(tiny), med)


def _images(n: int, height: int = 40, width: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- an independent reference


def _reference_raw(o: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, vheads: int,
                   theads: int) -> torch.Tensor:
    """ImageReward's raw score computed functionally from ORIGINAL-layout weights, following timm's ViT
    (BLIP's vit.py) and BLIP's med.py BERT (additive -10000 padding mask) step by step."""
    v = lambda k: o["blip.visual_encoder." + k]  # noqa: E731
    t = lambda k: o["blip.text_encoder." + k]  # noqa: E731
    w = v("patch_embed.proj.weight")
    x = F.conv2d(pixels, w, v("patch_embed.proj.bias"), stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token").expand(len(x), -1, -1), x], 1) + v("pos_embed")
    b, n, d = x.shape
    blocks = 1 + max(int(k.split(".")[3]) for k in o if k.startswith("blip.visual_encoder.blocks."))
    for i in range(blocks):
        p = lambda k: v(f"blocks.{i}.{k}")  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k_, val = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, n, 3, vheads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k_.transpose(-2, -1)) * (d // vheads) ** -0.5).softmax(-1)
        x = x + F.linear((a @ val).transpose(1, 2).reshape(b, n, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    img = F.layer_norm(x, (d,), v("norm.weight"), v("norm.bias"), 1e-6)

    def ln(h, k):
        return F.layer_norm(h, (h.shape[-1],), t(k + ".weight"), t(k + ".bias"), 1e-12)

    def lin(h, k):
        return F.linear(h, t(k + ".weight"), t(k + ".bias"))

    def attention(pre, h, ctx, add_mask):
        s = h.shape[1]
        heads = lambda z: z.view(b, z.shape[1], theads, -1).transpose(1, 2)  # noqa: E731
        q, k_, val = heads(lin(h, pre + ".self.query")), heads(lin(ctx, pre + ".self.key")), heads(lin(ctx, pre + ".self.value"))
        scores = q @ k_.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if add_mask is not None:
            scores = scores + add_mask
        out = (scores.softmax(-1) @ val).transpose(1, 2).reshape(b, s, -1)
        return ln(lin(out, pre + ".output.dense") + h, pre + ".output.LayerNorm")

    s = ids.shape[1]
    h = ln(t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[:s], "embeddings.LayerNorm")
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
    layers = 1 + max(int(k.split(".")[4]) for k in o if k.startswith("blip.text_encoder.encoder.layer."))
    for i in range(layers):
        pre = f"encoder.layer.{i}"
        h = attention(pre + ".attention", h, h, ext)
        h = attention(pre + ".crossattention", h, img, None)
        h = ln(lin(F.gelu(lin(h, pre + ".intermediate.dense")), pre + ".output.dense") + h, pre + ".output.LayerNorm")
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        r = F.linear(r, o[f"mlp.layers.{j}.weight"], o[f"mlp.layers.{j}.bias"])
    return r[:, 0]


# --------------------------------------------------------------------------- layout


def test_original_layout_names_and_round_trip(tiny):
    sd = tiny.state_dict()
    orig = to_original_layout(sd)
    for key in ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
                "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.1.attn.qkv.weight",
                "blip.visual_encoder.blocks.1.attn.proj.bias", "blip.visual_encoder.blocks.0.norm1.weight",
                "blip.visual_encoder.blocks.0.norm2.bias", "blip.visual_encoder.blocks.1.mlp.fc2.weight",
                "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
                "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.bias",
                "blip.text_encoder.encoder.layer.0.intermediate.dense.weight", "mlp.layers.0.weight", "mlp.layers.7.bias"]:
        assert key in orig, key
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")) for k in orig)
    assert orig["blip.visual_encoder.cls_token"].shape == (1, 1, 32)
    assert orig["blip.visual_encoder.pos_embed"].shape == (1, 1 + 16, 32)
    assert orig["blip.visual_encoder.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sorted(k for k in orig if k.startswith("mlp.")) == sorted(
        f"mlp.layers.{j}.{p}" for j in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    back = convert_imagereward_state_dict(orig)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # the unused keys of the original module are dropped, our own layout passes through unchanged
    assert convert_imagereward_state_dict(_original_sd(tiny)).keys() == sd.keys()
    assert convert_imagereward_state_dict(dict(sd)).keys() == sd.keys()


# --------------------------------------------------------------------------- loading


def test_from_pretrained_matches_in_memory_model(tiny, ckpt_dir, tok_dir, tmp_path):
    images = _images(3)
    expected = tiny(images, PROMPTS)
    assert expected.shape == (3,) and expected.std() > 1e-3  # not a constant
    loaded = ImageRewardModel.from_pretrained(ckpt_dir, tokenizer=tok_dir, vision_config=HEADS)
    torch.testing.assert_close(loaded(images, PROMPTS), expected, atol=0, rtol=0)
    assert loaded.vision.config.image_size == 32 and loaded.vision.config.layer_norm_eps == 1e-6
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # an explicit file + med_config, and the same weights as .safetensors
    f = ImageRewardModel.from_pretrained(ckpt_dir / "ImageReward.pt", med_config=ckpt_dir / "med_config.json",
                                         tokenizer=str(tok_dir), vision_config=HEADS)
    torch.testing.assert_close(f(images, PROMPTS), expected, atol=0, rtol=0)
    st = _write(tmp_path / "st", _original_sd(tiny), json.loads((ckpt_dir / "med_config.json").read_text()),
                "ImageReward.safetensors")
    s = ImageRewardModel.from_pretrained(st, tokenizer=tok_dir, vision_config=HEADS)
    torch.testing.assert_close(s(images, PROMPTS), expected, atol=0, rtol=0)


def test_matches_functional_reference_of_the_original(tiny, ckpt_dir):
    # short, medium and over-long prompts: padding masks differ per row
    prompts = [PROMPTS[2], PROMPTS[0], " ".join(WORDS * 3)]
    images = _images(3, 48, 36, seed=5)
    orig = torch.load(ckpt_dir / "ImageReward.pt", map_location="cpu", weights_only=True)
    ids, mask = tiny.tokenize(prompts)
    assert mask.sum(1).tolist()[0] < mask.sum(1).tolist()[1] < 35 == mask.sum(1).tolist()[2]
    pixels = imagereward_preprocess(images, 32)
    with torch.no_grad():
        ref = _reference_raw(orig, pixels, ids, mask, vheads=2, theads=2)
        got = tiny.raw_scores(images, prompts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tiny, med, tok_dir, tmp_path):
    sd = _original_sd(tiny)
    gone = dict(sd)
    del gone["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    with pytest.raises(ModelLoadError, match=r"1 missing: blip\.visual_encoder\.blocks\.1\.attn\.qkv\.weight"):
        ImageRewardModel.from_pretrained(_write(tmp_path / "a", gone, med), tokenizer=tok_dir, vision_config=HEADS)
    extra = {**sd, "blip.visual_encoder.head.weight": torch.zeros(2, 32), "blip.itm_head.bias": torch.zeros(2)}
    with pytest.raises(ModelLoadError, match=r"2 unexpected: .*blip\.visual_encoder\.head\.weight"):
        ImageRewardModel.from_pretrained(_write(tmp_path / "b", extra, med), tokenizer=tok_dir, vision_config=HEADS)
    bad = {**sd, "mlp.layers.6.weight": torch.zeros(16, 63)}
    with pytest.raises(ModelLoadError, match=r"wrong shape: mlp\.layers\.6\.weight \(16, 63\) \(expected \(16, 64\)\)"):
        ImageRewardModel.from_pretrained(_write(tmp_path / "c", bad, med), tokenizer=tok_dir, vision_config=HEADS)
    no_text = {k: v for k, v in sd.items() if "crossattention" not in k}
    with pytest.raises(ModelLoadError, match=r"missing: blip\.text_encoder\.encoder\.layer\.0\.crossattention"):
        ImageRewardModel.from_pretrained(_write(tmp_path / "d", no_text, med), tokenizer=tok_dir, vision_config=HEADS)


def test_missing_files_name_what_and_where(ckpt_dir, med, tok_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"ImageReward\.pt not found in .*huggingface\.co/THUDM/ImageReward"):
        ImageRewardModel.from_pretrained(tmp_path, tokenizer=tok_dir)
    with pytest.raises(ModelLoadError, match=r"does not exist: expected ImageReward\.pt"):
        ImageRewardModel.from_pretrained(tmp_path / "nowhere.pt", tokenizer=tok_dir)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "ImageReward.pt").write_bytes((ckpt_dir / "ImageReward.pt").read_bytes())
    with pytest.raises(ModelLoadError, match=r"med_config\.json not found .*huggingface\.co/THUDM/ImageReward"):
        ImageRewardModel.from_pretrained(lonely, tokenizer=tok_dir)
    with pytest.raises(ModelLoadError, match=r"bert-base-uncased tokenizer .*save_pretrained"):
        ImageRewardModel.from_pretrained(ckpt_dir)
    with pytest.raises(ModelLoadError, match=r"bert-base-uncased tokenizer folder .*no-tok"):
        ImageRewardModel.from_pretrained(ckpt_dir, tokenizer=tmp_path / "no-tok")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"could not read ImageReward checkpoint"):
        ImageRewardModel.from_pretrained(tmp_path / "junk.pt", med_config=ckpt_dir / "med_config.json", tokenizer=tok_dir)


def test_tokenizer_next_to_checkpoint_and_vocab_check(tiny, med, tok_dir, tmp_path):
    folder = _write(tmp_path / "ir", _original_sd(tiny), med)
    (folder / "bert-base-uncased").mkdir()
    (folder / "bert-base-uncased" / "vocab.txt").write_text((tok_dir / "vocab.txt").read_text())
    m = ImageRewardModel.from_pretrained(folder, vision_config=HEADS)
    torch.testing.assert_close(m(_images(3), PROMPTS), tiny(_images(3), PROMPTS), atol=0, rtol=0)
    wrong = _write(tmp_path / "wrong", _original_sd(tiny), {**med, "vocab_size": med["vocab_size"] + 1})
    with pytest.raises(ModelLoadError, match=r"vocab_size .*bert-base-uncased"):
        ImageRewardModel.from_pretrained(wrong, tokenizer=tok_dir, vision_config=HEADS)
    with pytest.raises(ModelLoadError, match=r"add_cross_attention"):
        ImageRewardModel.from_pretrained(_write(tmp_path / "nox", _original_sd(tiny), {**med, "add_cross_attention": False}),
                                         tokenizer=tok_dir, vision_config=HEADS)


def test_registered_and_loadable_by_spec(ckpt_dir, tok_dir, tiny):
    assert REWARDS["imagereward"] == ImageRewardModel.from_pretrained
    r = load_reward({"name": "imagereward", "checkpoint": str(ckpt_dir), "tokenizer": str(tok_dir),
                     "vision_config": HEADS, "cap": None})
    assert isinstance(r, ImageRewardModel) and r.cap is None
    d = r.describe()
    assert d["reward"] == "imagereward" and d["cap"] is None and d["max_length"] == 35
    assert d["checkpoint"].endswith("ImageReward.pt") and d["mean"] == IMAGEREWARD_MEAN
    assert tiny.describe()["cap"] == 2.0 and "capped at 2.0" in tiny.describe()["definition"]
    assert tiny.preference_scale() == pytest.approx(IMAGEREWARD_STD)


# --------------------------------------------------------------------------- scoring


def test_gradient_reaches_images(tiny):
    images = _images(3, 36, 50).requires_grad_(True)
    tiny.cap = None
    try:
        tiny(images, PROMPTS).sum().backward()
    finally:
        tiny.cap = 2.0
    g = images.grad
    assert g is not None and torch.isfinite(g).all() and (g.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_cap_and_standardisation(tiny):
    images = _images(3)
    tiny.cap = None
    try:
        raw_std = tiny(images, PROMPTS)
        with torch.no_grad():
            by_hand = (tiny.mlp(tiny.features(images, PROMPTS))[:, 0] - 0.16717362830052426) / 1.0333394966054072
        torch.testing.assert_close(raw_std, by_hand, atol=1e-6, rtol=0)
        cap = float(raw_std.median())  # caps some rows, not all
        tiny.cap = cap
        x = images.clone().requires_grad_(True)
        capped = tiny(x, PROMPTS)
        capped.sum().backward()
    finally:
        tiny.cap = 2.0
    assert (capped <= cap + 1e-6).all()
    torch.testing.assert_close(capped, torch.clamp(raw_std, max=cap), atol=1e-6, rtol=0)
    above = raw_std > cap
    assert above.any() and (~above).any()
    assert (x.grad[above].abs().sum() == 0) and (x.grad[~above].abs().sum() > 0)  # flat above the cap
    torch.testing.assert_close(tiny(images, PROMPTS), torch.clamp(raw_std, max=2.0), atol=1e-6, rtol=0)


def test_enc_token_replaces_cls_inside_forward_and_truncation(tiny):
    seen = []
    hook = tiny.text.embeddings.word_embeddings.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        tiny(_images(2), ["a cat", " ".join(WORDS * 4)])
    finally:
        hook.remove()
    (ids,) = seen
    enc = tiny.tokenizer.convert_tokens_to_ids("[ENC]")
    assert enc == tiny.enc_token_id == len(tiny.tokenizer) - 1  # [DEC] then [ENC] after the base vocab
    assert tiny.tokenizer.convert_tokens_to_ids("[DEC]") == tiny.tokenizer.bos_token_id == enc - 1
    assert ids.shape == (2, 35) and (ids[:, 0] == enc).all()
    cls, sep, pad = (tiny.tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert not (ids == cls).any()
    assert ids[0, 1:4].tolist() == [tiny.tokenizer.convert_tokens_to_ids("a"), tiny.tokenizer.convert_tokens_to_ids("cat"), sep]
    assert (ids[0, 4:] == pad).all() and ids[1, -1] == sep and not (ids[1] == pad).any()
    _, mask = tiny.tokenize(["a cat", " ".join(WORDS * 4)])
    assert mask[0].sum() == 4 and mask[1].sum() == 35
    # text past the 35 tokens does not change the score
    long_a, long_b = " ".join(WORDS * 4), " ".join(WORDS * 4) + " cat dog"
    torch.testing.assert_close(tiny(_images(1), [long_a]), tiny(_images(1), [long_b]), atol=0, rtol=0)


def test_rejects_bad_inputs(tiny):
    with pytest.raises(DataError, match="one prompt per image"):
        tiny(_images(2), PROMPTS)
    with pytest.raises(DataError, match=r"\[N,3,H,W\]"):
        tiny(torch.rand(3, 32, 32), PROMPTS)


# --------------------------------------------------------------------------- preprocessing


def _smooth_card(width: int, height: int) -> Image.Image:
    """A deterministic non-square RGB image of smooth gradients and waves (photo-like content)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 100 * np.sin(x / 9) * np.cos(y / 13)
    g = 127 + 100 * np.sin((x + y) / 17)
    b = 127 + 100 * np.cos(x / 5 - y / 11)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8), "RGB")


def _reference(size: int):
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                    Normalize(CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("wh", [(300, 200), (200, 333), (150, 101)])
def test_preprocess_matches_reference_transform(wh, tmp_path):
    _smooth_card(*wh).save(tmp_path / "card.png")
    img = Image.open(tmp_path / "card.png")
    ref = _reference(224)(img)
    # the PIL helper takes the reference's path (resize on the uint8 PIL image first): exact
    torch.testing.assert_close(imagereward_preprocess_pil(img), ref, atol=1e-6, rtol=0)
    # the differentiable tensor path resizes in float: PIL rounds to uint8 (and clips) after each of its two
    # separable passes, so up to ~1.1 levels of 255 differ (measured max 0.0164 after dividing by std ~0.27,
    # mean ~0.0045); allow 2 levels / min(std) = 0.0304
    out = imagereward_preprocess(ToTensor()(img)[None])[0]
    diff = (out - ref).abs()
    assert out.shape == (3, 224, 224)
    assert diff.max() < 2 / 255 / min(CLIP_STD), float(diff.max())
    assert diff.mean() < 0.5 / 255 / min(CLIP_STD), float(diff.mean())


def test_preprocess_exact_without_resampling_and_on_tiny_size():
    img = _smooth_card(224, 300)  # short edge already 224: only the centre crop (rows 38..261)
    torch.testing.assert_close(imagereward_preprocess(ToTensor()(img)[None])[0], _reference(224)(img), atol=1e-6, rtol=0)
    arr = np.asarray(img, dtype=np.float64)[38:262] / 255
    expected = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(imagereward_preprocess_pil(img).double().permute(1, 2, 0).numpy(), expected, atol=1e-6)
    small = _smooth_card(48, 40)
    torch.testing.assert_close(imagereward_preprocess_pil(small, 32), _reference(32)(small), atol=1e-6, rtol=0)
    assert imagereward_preprocess(_images(2, 40, 48), 32).shape == (2, 3, 32, 32)
    rgba = small.copy()
    rgba.putalpha(200)
    assert imagereward_preprocess_pil(rgba, 32).shape == (3, 32, 32)
    with pytest.raises(DataError):
        imagereward_preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
