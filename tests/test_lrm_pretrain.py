"""`fastgen lrm pretrain` for a real teacher: a tiny SD2.1-shaped (v-prediction) stand-in, a folder of
captioned images with long captions, full-length text towers (teacher copy / open_clip), reload,
errors, and the rg-lcd-sd21-hps recipe run end to end with the resulting LRM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.cli import main
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.rewards.latent_proxy import LatentRewardModel, LRMConfig, LRMPretrainConfig
from fastgen.rewards.lrm_pretrain import build_lrm, load_teacher_parts, pretrain_lrm_on_data, resolve_architecture
from tiny_models import TOKENIZER_CORPUS, make_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[1] / "fastgen" / "recipes" / "rg-lcd-sd21-hps.yaml"
WORDS = " ".join(TOKENIZER_CORPUS).replace(",", "").split()
#: seconds-long LRM pre-training on the tiny stand-in (the `tiny` preset: 1-layer ViT + the teacher's text encoder)
FAST = ["preset=tiny", "steps=3", "batch_size=4", "log_every=1", "device=cpu"]


def long_caption(i: int, n_words: int = 50) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words))


def make_caption_folder(folder: Path, n: int = 8, size: int = 24) -> Path:
    """``n`` random PNGs (``size`` px, resized by the loader) with captions of ``n_words`` corpus words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(long_caption(i))
    return folder


def pretrain_cli(teacher, data, out, *extra) -> int:
    return main(["lrm", "pretrain", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def sd21(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd21") / "sd21", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return make_caption_folder(tmp_path_factory.mktemp("data") / "captioned")


@pytest.fixture(scope="module")
def lrm_folder(sd21, captions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lrm") / "lrm-sd21"
    assert pretrain_cli(sd21, captions, out) == 0
    return out


# --------------------------------------------------------------------------- pre-train, save, reload


def test_captions_are_longer_than_the_digits_window(sd21, captions):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sd21 / "tokenizer"))
    lengths = [len(tok((captions / f"img{i}.txt").read_text()).input_ids) for i in range(8)]
    assert min(lengths) > 45  # well past the digits LRM's 16 tokens and past the 40th


def test_cli_pretrains_saves_and_reloads(lrm_folder, sd21):
    for name in ("config.json", "model.safetensors", "tokenizer", "pretrain_metrics.json"):
        assert (lrm_folder / name).exists(), name
    assert not list(lrm_folder.glob("*.bin")) and not list(lrm_folder.glob("*.pt"))  # safetensors only
    info = json.loads((lrm_folder / "config.json").read_text())
    assert info["format"] == "fastgen-latent-reward-model"
    metrics = json.loads((lrm_folder / "pretrain_metrics.json").read_text())
    assert metrics["config"]["steps"] == 3 and metrics["source_kind"] == "folder" and np.isfinite(metrics["final_loss"])
    assert metrics["latent_shape"] == [4, 8, 8] and metrics["text_max_length"] == 77

    lrm = LatentRewardModel.from_pretrained(lrm_folder)
    cfg = lrm.config
    assert (cfg.tower, cfg.text_tower, cfg.text_max_length, lrm.latent_shape) == ("vit", "clip", 77, (4, 8, 8))
    assert lrm.meta["teacher_path"] == str(sd21) and lrm.meta["text_init"] == "teacher:text_encoder"
    assert lrm.meta["scaling_factor"] == pytest.approx(0.18215)
    assert all(not p.requires_grad for p in lrm.parameters()) and not lrm.training
    # the reloaded weights are exactly the saved ones
    from safetensors.torch import load_file

    saved = load_file(str(lrm_folder / "model.safetensors"))
    for k, v in lrm.state_dict().items():
        assert torch.equal(v, saved[k]), k
    z = torch.randn(3, 4, 8, 8)
    prompts = [long_caption(i) for i in range(3)]
    again = LatentRewardModel.from_pretrained(lrm_folder)
    torch.testing.assert_close(lrm(z, prompts), again(z, prompts), rtol=0, atol=0)


def test_text_tower_sees_the_40th_token(lrm_folder, sd21):
    lrm = LatentRewardModel.from_pretrained(lrm_folder)
    ids, mask = lrm.tokenize([long_caption(0)])
    assert ids.shape == (1, 77) and int(mask.sum()) == 77  # the caption fills the whole window
    other = ids.clone()
    pos = 40  # the 40th token of the caption (position 0 is the start token)
    other[0, pos] = (ids[0, pos] + 7) % len(lrm.tokenizer)
    assert int((other != ids).sum()) == 1
    a, b = lrm.encode_tokens(ids, mask), lrm.encode_tokens(other, mask)
    assert (a - b).abs().max() > 1e-4
    # the same caption through the digits LRM's 16-token window: the change is invisible
    short = LatentRewardModel(LRMConfig(vocab_size=len(lrm.tokenizer)), lrm.tokenizer)
    text = lrm.tokenizer.decode(ids[0, 1:-1])
    changed = lrm.tokenizer.decode(other[0, 1:-1])
    s_ids, s_mask = short.tokenize([text, changed])
    assert s_ids.shape[1] == 16 and torch.equal(s_ids[0], s_ids[1])
    # and through the string interface of the long LRM it is visible
    t_ids, _ = lrm.tokenize([text, changed])
    assert not torch.equal(t_ids[0], t_ids[1])


def test_text_tower_starts_as_the_teachers_text_encoder(sd21):
    """``text_tower=teacher``: the LRM's text tower is a copy of the teacher's CLIPTextModel (same pooled output)."""
    parts = load_teacher_parts(str(sd21))
    cfg = LRMPretrainConfig(teacher=str(sd21), data="unused", preset="tiny")
    lrm = build_lrm(cfg, resolve_architecture(cfg), parts.tokenizer, 4, 8, {}, text_encoder=parts.text_encoder)
    ids, mask = lrm.tokenize([long_caption(3), "a cat"])
    with torch.no_grad():
        ours = lrm.text_tower.encoder(input_ids=ids, attention_mask=mask).pooler_output
        theirs = parts.text_encoder(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the teacher's latents: (mean - shift) * scaling_factor, as the teacher's pipeline encodes
    from fastgen.models.teacher import Teacher

    px = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(parts.encode(px), Teacher.from_pretrained(sd21).encode(px), rtol=1e-5, atol=1e-6)


def test_rg_lcd_preset_is_the_papers_latent_vit():
    arch = resolve_architecture(LRMPretrainConfig(teacher="x", data="some/folder"))
    assert arch["preset"] == "rg-lcd-vit"
    assert {k: arch[k] for k in ("tower", "patch_size", "width", "depth", "heads", "embed_dim", "text_tower")} == {
        "tower": "vit", "patch_size": 4, "width": 512, "depth": 12, "heads": 8, "embed_dim": 1024, "text_tower": "teacher"}
    assert (arch["unlocked_text_layers"], arch["unlocked_image_layers"]) == (5, 1)
    assert resolve_architecture(LRMPretrainConfig())["preset"] == "digits-cnn"  # the digits default is unchanged
    assert resolve_architecture(LRMPretrainConfig(data="f", width=64))["width"] == 64  # fields override the preset
    with pytest.raises(ConfigError, match="preset"):
        resolve_architecture(LRMPretrainConfig(preset="huge"))


def test_unlocked_layers_limit_what_alignment_trains(lrm_folder, tmp_path):
    lrm = LatentRewardModel.from_pretrained(lrm_folder, trainable=True)
    assert all(p.requires_grad for p in lrm.parameters())  # tiny preset: everything
    lrm.config.unlocked_text_layers, lrm.config.unlocked_image_layers = 1, 0
    lrm.unfreeze()
    enc = lrm.text_tower.encoder
    assert all(p.requires_grad for p in enc.encoder.layers[-1].parameters())
    assert not any(p.requires_grad for p in enc.encoder.layers[0].parameters())
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    assert not any(p.requires_grad for p in lrm.image_tower.layers.parameters())
    assert lrm.image_tower.proj.weight.requires_grad and lrm.text_tower.proj.weight.requires_grad
    assert lrm.logit_scale.requires_grad


# --------------------------------------------------------------------------- other sources and towers


def test_webdataset_shards(sd21, tmp_path):
    from fastgen.data.shards import write_shards

    rng = np.random.default_rng(1)
    items = [(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), long_caption(i)) for i in range(6)]
    write_shards(items, tmp_path / "shards", per_shard=3)
    out = pretrain_lrm_on_data(LRMPretrainConfig(teacher=str(sd21), data=str(tmp_path / "shards"), out=str(tmp_path / "lrm"),
                                                 preset="tiny", steps=2, batch_size=3, log_every=1, device="cpu", eval_size=4))
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["source_kind"] == "shards" and metrics["batch_size"] == 3
    assert LatentRewardModel.from_pretrained(out).config.text_max_length == 77


def test_latent_cache_source(sd21, captions, tmp_path):
    """A latent cache of this teacher (data.latent_cache=true of a training run) is read as it is: no VAE encode."""
    from fastgen.data.folders import ImageCaptionFolder
    from fastgen.data.sources import DataConfig, build_latent_cache
    from fastgen.models.teacher import Teacher

    spec = DataConfig(source=str(captions), latent_cache=True, cache_dir=str(tmp_path / "cache"))
    cache = build_latent_cache(spec, ImageCaptionFolder(captions, resolution=16), Teacher.from_pretrained(sd21), str(sd21), 16)
    out = pretrain_lrm_on_data(LRMPretrainConfig(teacher=str(sd21), data=str(cache.root), out=str(tmp_path / "lrm"),
                                                 preset="tiny", steps=2, batch_size=4, log_every=1, device="cpu"))
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["source_kind"] == "cache" and metrics["encode_time_s"] < 1


def test_expert_reward_distillation_term(sd21, captions, tmp_path):
    from fastgen.rewards.base import REWARDS, RewardModel, register_reward

    class Brightness(RewardModel):
        """A toy expert that depends on the image and the prompt."""

        name = "toy-brightness"

        def forward(self, images, prompts):
            self.check_inputs(images, prompts)
            sign = torch.tensor([1.0 if len(p) % 2 else -1.0 for p in prompts], device=images.device)
            return 3 * sign * images.mean(dim=(1, 2, 3))

    register_reward("toy-brightness", Brightness)
    try:
        out = pretrain_lrm_on_data(LRMPretrainConfig(
            teacher=str(sd21), data=str(captions), out=str(tmp_path / "lrm"), preset="tiny", steps=2, batch_size=4,
            log_every=1, device="cpu", expert="toy-brightness", expert_batch_size=3))
    finally:
        REWARDS.pop("toy-brightness", None)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["final_expert_loss"] is not None and metrics["final_expert_loss"] >= 0


def _tiny_open_clip(tokenizer, name: str):
    """Register a tiny open_clip config whose text vocabulary is the tiny tokenizer's (EOS pooling)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": len(tokenizer), "width": 32, "heads": 2, "layers": 2,
                     "pool_type": "eos", "eos_id": int(tokenizer.eos_token_id)},
    }


def test_open_clip_text_tower_from_a_local_checkpoint(sd21, tmp_path):
    import open_clip
    from open_clip import factory
    from safetensors.torch import save_file

    parts = load_teacher_parts(str(sd21), text_encoder=None)
    _tiny_open_clip(parts.tokenizer, "fastgen-lrm-tiny-oc")
    try:
        torch.manual_seed(3)
        model = open_clip.create_model("fastgen-lrm-tiny-oc", pretrained=None).eval()
        ckpt = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        cfg = LRMPretrainConfig(teacher=str(sd21), data="x", preset="tiny", text_tower="open_clip",
                                open_clip_model="fastgen-lrm-tiny-oc", open_clip_checkpoint=str(ckpt))
        lrm = build_lrm(cfg, resolve_architecture(cfg), parts.tokenizer, 4, 8, {})
        ids, mask = lrm.tokenize([long_caption(2), "a dog"])
        with torch.no_grad():
            torch.testing.assert_close(lrm.text_tower.encoder(ids), model.encode_text(ids), rtol=1e-5, atol=1e-6)
            changed = ids.clone()
            changed[0, 40] = (ids[0, 40] + 5) % len(parts.tokenizer)
            assert (lrm.encode_tokens(ids, mask) - lrm.encode_tokens(changed, mask)).abs().max() > 1e-4
        folder = lrm.save_pretrained(tmp_path / "lrm")
        again = LatentRewardModel.from_pretrained(folder)
        assert again.config == lrm.config and again.config.text_tower == "open_clip"
        # a vocabulary that is not the teacher's tokenizer's is refused
        with pytest.raises(ConfigError, match="vocabulary"):
            c2 = LRMPretrainConfig(teacher=str(sd21), data="x", preset="tiny", text_tower="open_clip", open_clip_model="ViT-B-32")
            build_lrm(c2, resolve_architecture(c2), parts.tokenizer, 4, 8, {})
        with pytest.raises(ModelLoadError, match="nope.safetensors"):
            c3 = replace_cfg(cfg, open_clip_checkpoint=str(tmp_path / "nope.safetensors"))
            build_lrm(c3, resolve_architecture(c3), parts.tokenizer, 4, 8, {})
    finally:
        factory._MODEL_CONFIGS.pop("fastgen-lrm-tiny-oc", None)


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


# --------------------------------------------------------------------------- errors


def test_wrong_teacher_folder_and_missing_weights(sd21, captions, tmp_path, capsys):
    assert pretrain_cli(tmp_path / "no-teacher", captions, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "model_index.json" in err
    broken = Path(shutil.copytree(sd21, tmp_path / "broken"))
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert pretrain_cli(broken, captions, tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "vae" in err and "no weights" in err and "diffusion_pytorch_model.safetensors" in err
    shutil.copy(sd21 / "vae" / "diffusion_pytorch_model.safetensors", broken / "vae")
    (broken / "text_encoder" / "model.safetensors").unlink()
    assert pretrain_cli(broken, captions, tmp_path / "o3") == 2
    assert "text_encoder" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_wrong_data_folder(sd21, tmp_path, capsys):
    assert pretrain_cli(sd21, tmp_path / "no-data", tmp_path / "o") == 2
    assert "no-data" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        pretrain_lrm_on_data(LRMPretrainConfig(teacher=str(sd21), data=str(tmp_path / "empty"), out=str(tmp_path / "o"),
                                               preset="tiny", steps=1, batch_size=2, device="cpu"))
    assert not (tmp_path / "o").exists()


def test_lrm_folder_missing_weights_file(lrm_folder, tmp_path):
    folder = Path(shutil.copytree(lrm_folder, tmp_path / "lrm"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LatentRewardModel.from_pretrained(folder)
    with pytest.raises(ModelLoadError, match="not found"):
        LatentRewardModel.from_pretrained(tmp_path / "nowhere")


def test_output_folder_of_other_files_is_refused(sd21, captions, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an LRM folder"):
        pretrain_lrm_on_data(LRMPretrainConfig(teacher=str(sd21), data=str(captions), out=str(tmp_path / "mine"),
                                               preset="tiny", steps=1, batch_size=2, device="cpu"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- the SD2.1 recipe, end to end


def test_rg_lcd_sd21_hps_recipe_runs_with_the_pretrained_lrm(sd21, captions, lrm_folder, tmp_path, capsys):
    """The GPU recipe on the tiny stand-in: only paths, sizes and precision overridden; HPS is a tiny open_clip."""
    import open_clip

    from tiny_models import tiny_open_clip_configs

    from fastgen.data.shards import write_shards

    # the recipe's own data kind (webdataset shards), tiny
    items = [(Image.open(captions / f"img{i}.png").convert("RGB"), (captions / f"img{i}.txt").read_text()) for i in range(8)]
    write_shards(items, tmp_path / "shards", per_shard=4)
    common = ["teacher.path=" + str(sd21), "teacher.resolution=16", "teacher.dtype=float32",
              "data.source=" + str(tmp_path / "shards"), "train.max_steps=2", "train.batch_size=2", "train.mixed_precision=no"]
    with tiny_open_clip_configs("fastgen-lrm-tiny-hps", "fastgen-lrm-tiny-clip"):
        torch.manual_seed(0)
        hps = tmp_path / "HPS_v2.1_compressed.pt"
        torch.save({"state_dict": open_clip.create_model("fastgen-lrm-tiny-hps", pretrained=None).state_dict()}, hps)
        reward = f"rg_lcd.reward={{name: hpsv2, checkpoint: {hps}, version: v2.1, model_name: fastgen-lrm-tiny-hps}}"
        # the recipe's own lrm_path (models/lrm-sd21-768) is absent: a clear error naming the pre-training command
        assert main(["train", "rg-lcd", "--config", str(RECIPE), f"output_dir={tmp_path / 'run0'}", *common, reward]) == 2
        assert "lrm pretrain" in capsys.readouterr().err
        rc = main(["train", "rg-lcd", "--config", str(RECIPE), f"output_dir={tmp_path / 'run'}", *common, reward,
                   f"rg_lcd.lrm_path={lrm_folder}"])
    assert rc == 0
    assert list((tmp_path / "run" / "checkpoints").iterdir())
