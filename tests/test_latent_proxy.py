"""The latent proxy reward model: pairwise alignment loss, online alignment, persistence, shape
checks, freezing, and a short contrastive pre-training on the shipped digits teacher."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.rewards.base import RewardModel
from fastgen.rewards.latent_proxy import (
    LatentRewardModel,
    LRMAligner,
    LRMConfig,
    LRMPretrainConfig,
    label_aware_info_nce,
    pairwise_preference_loss,
    pretrain_lrm,
)
from fastgen.zoo import paths

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "green digit one", "the digit two written in cyan"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(paths.sd_teacher() / "tokenizer"), local_files_only=True)


def small_lrm(tokenizer, tower="cnn", **kw) -> LatentRewardModel:
    cfg = LRMConfig(tower=tower, width=32, depth=2, embed_dim=32, text_width=32, text_layers=1, **kw)
    return LatentRewardModel(cfg, tokenizer)


class LinearExpert(RewardModel):
    """A fixed random linear function of the images (per-channel weights of the channel means)."""

    name = "linear"

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(channels, generator=g))
        self.freeze()

    def forward(self, images, prompts):
        self.check_inputs(images, prompts)
        return 4.0 * (images.mean(dim=(-2, -1)) * self.w).sum(-1)


def make_decode(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, 4, generator=g) / 2

    def decode(z):  # a fixed 1x1 mix to 3 channels, 2x nearest upsampling
        img = torch.einsum("oc,nchw->nohw", mix, z)
        return F.interpolate(img, scale_factor=2, mode="nearest")

    return decode


# --------------------------------------------------------------------------- pairwise loss


def test_pairwise_loss_zero_when_equal_and_positive_otherwise():
    e = torch.randn(16, 3) * 3
    loss, acc = pairwise_preference_loss(e, e.clone())
    assert abs(float(loss)) < 1e-5
    assert float(acc) == 1.0
    loss2, acc2 = pairwise_preference_loss(e, e + torch.randn(16, 3))
    assert float(loss2) > 1e-4


def test_pairwise_agreement_orders():
    e = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    _, acc_same = pairwise_preference_loss(e, e * 0.1)  # same order, other scale
    assert float(acc_same) == 1.0
    _, acc_rev = pairwise_preference_loss(e, -e)
    assert float(acc_rev) == 0.0


def _pair_kl(e_pair, s_pair, p=None):
    p = torch.softmax(torch.tensor(e_pair), 0) if p is None else torch.tensor(p)
    log_q = torch.log_softmax(torch.tensor(s_pair), 0)
    return float((p * (p.log() - log_q)).sum())


def test_smooth_gt_label_only_changes_gt_pairs_where_generated_wins():
    # the expert prefers the student over the real latent (pair (0,2)) but the real latent over the target
    e = torch.tensor([[2.0, -1.0, 0.5]])
    s = torch.tensor([[0.3, 0.1, 1.2]])
    plain, _ = pairwise_preference_loss(e, s)
    smooth, _ = pairwise_preference_loss(e, s, smooth_gt_label=True)
    kl01 = _pair_kl([2.0, -1.0], [0.3, 0.1])
    kl02 = _pair_kl([2.0, 0.5], [0.3, 1.2])
    kl02_smooth = _pair_kl(None, [0.3, 1.2], p=[0.5, 0.5])
    kl12 = _pair_kl([-1.0, 0.5], [0.1, 1.2])
    assert float(plain) == pytest.approx(kl01 + kl02 + kl12, rel=1e-5)
    assert float(smooth) == pytest.approx(kl01 + kl02_smooth + kl12, rel=1e-5)
    assert float(smooth) != pytest.approx(float(plain))
    # when the expert prefers the real latent in both GT pairs, smoothing changes nothing
    e2 = torch.tensor([[0.0, -1.0, 2.0]])
    assert float(pairwise_preference_loss(e2, s)[0]) == pytest.approx(float(pairwise_preference_loss(e2, s, True)[0]))


def test_pairwise_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        pairwise_preference_loss(torch.zeros(4, 2), torch.zeros(4, 2))


def test_label_aware_info_nce_prefers_class_alignment():
    labels = torch.tensor([0, 0, 1, 2])
    good = (labels[:, None] == labels[None, :]).float() * 10
    assert float(label_aware_info_nce(good, labels)) < float(label_aware_info_nce(-good, labels))
    # with two positives in a row the optimum is log 2 for that row, not 0
    # (rows 0 and 1 reach log 2, rows 2 and 3 reach 0, in both directions)
    assert float(label_aware_info_nce(good * 10, labels)) == pytest.approx(math.log(2) / 2, rel=1e-3)


# --------------------------------------------------------------------------- online alignment


def _triples(n, g):
    return [torch.randn(n, 4, 8, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("tower", ["cnn", "vit"])
def test_alignment_raises_agreement(tokenizer, tower):
    torch.manual_seed(0)
    lrm = small_lrm(tokenizer, tower=tower)
    aligner = LRMAligner(lrm, LinearExpert(), make_decode(), lr=3e-3, batch_size=32)
    g = torch.Generator().manual_seed(123)
    held = _triples(128, g)
    held_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(128)]
    before = aligner.evaluate(*held, held_prompts)["lrm_agreement"]
    for step in range(100):
        s, t, r = _triples(48, g)
        stats = aligner.step(s, t, r, [PROMPTS[(step + i) % len(PROMPTS)] for i in range(48)])
        assert set(stats) == {"lrm_loss", "lrm_agreement"} and math.isfinite(stats["lrm_loss"])
    after = aligner.evaluate(*held, held_prompts)["lrm_agreement"]
    assert after > 0.8 and after > before, (before, after)
    assert aligner.updates == 100


def test_should_update_ratio(tokenizer):
    aligner = LRMAligner(small_lrm(tokenizer), LinearExpert(), make_decode(), lr=1e-3, update_every=3)
    assert [s for s in range(10) if aligner.should_update(s)] == [0, 3, 6, 9]
    with pytest.raises(ConfigError):
        LRMAligner(small_lrm(tokenizer), LinearExpert(), make_decode(), lr=1e-3, update_every=0)


def test_lrm_frozen_after_step_and_student_gets_gradients(tokenizer):
    lrm = small_lrm(tokenizer)
    aligner = LRMAligner(lrm, LinearExpert(), make_decode(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    before = {k: v.clone() for k, v in lrm.state_dict().items()}
    aligner.step(*_triples(8, g), PROMPTS * 2)
    assert any(not torch.equal(before[k], v) for k, v in lrm.state_dict().items())  # it did learn
    assert not lrm.training
    assert all(not p.requires_grad for p in lrm.parameters())
    z = torch.randn(4, 4, 8, 8, requires_grad=True)
    (-lrm(z, PROMPTS).mean()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in lrm.parameters())


def test_aligner_state_round_trip_through_safetensors(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    batches = [(_triples(8, g), PROMPTS * 2) for _ in range(3)]
    a = LRMAligner(small_lrm(tokenizer), LinearExpert(), make_decode(), lr=1e-3)
    for trip, pr in batches[:2]:
        a.step(*trip, pr)
    sd = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file(sd, str(tmp_path / "aligner.safetensors"))
    torch.manual_seed(7)
    b = LRMAligner(small_lrm(tokenizer), LinearExpert(), make_decode(), lr=5e-2)
    b.load_state_dict(load_file(str(tmp_path / "aligner.safetensors")))
    assert b.updates == 2 and b.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    a.step(*batches[2][0], batches[2][1])
    b.step(*batches[2][0], batches[2][1])
    for (k, va), vb in zip(a.lrm.state_dict().items(), b.lrm.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


# --------------------------------------------------------------------------- model, persistence, shapes


def test_lrm_forward_logits_and_train_mode(tokenizer):
    lrm = small_lrm(tokenizer)
    assert lrm.config.vocab_size == len(tokenizer)
    z = torch.randn(4, 4, 8, 8)
    cos = lrm(z, PROMPTS)
    assert cos.shape == (4,) and cos.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(lrm.logits(z, PROMPTS), cos * lrm.preference_scale())
    assert lrm.preference_scale() == pytest.approx(1 / 0.07, rel=1e-5)
    lrm.train()
    assert lrm.training  # unlike pixel reward models, the LRM can train


def test_text_cache_only_when_frozen_and_invalidated_by_updates(tokenizer):
    lrm = small_lrm(tokenizer)
    lrm.unfreeze()
    t = lrm.encode_text(PROMPTS[:2])
    assert t.requires_grad and not lrm._text_cache  # training: no cache, gradients flow
    lrm.freeze()
    first = lrm.encode_text(PROMPTS[:2])
    assert set(lrm._text_cache) == set(PROMPTS[:2])
    with torch.no_grad():
        lrm.text_tower.proj.weight.add_(torch.randn_like(lrm.text_tower.proj.weight))
    second = lrm.encode_text(PROMPTS[:2])
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, lrm.encode_tokens(*lrm.tokenize(PROMPTS[:2])))
    # features cached under inference mode still serve a later student loss with gradients
    lrm.clear_text_cache()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.inference_mode():
        lrm(z.detach(), PROMPTS[:2])
    lrm(z, PROMPTS[:2]).sum().backward()
    assert z.grad is not None


@pytest.mark.parametrize("tower", ["cnn", "vit"])
def test_save_load_round_trip(tokenizer, tmp_path, tower):
    lrm = small_lrm(tokenizer, tower=tower)
    lrm.meta["teacher"] = "digits-sd"
    folder = lrm.save_pretrained(tmp_path / "lrm")
    for name in ("config.json", "model.safetensors", "tokenizer"):
        assert (folder / name).exists()
    loaded = LatentRewardModel.from_pretrained(folder)
    assert loaded.config == lrm.config and loaded.meta["teacher"] == "digits-sd"
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    z = torch.randn(3, 4, 8, 8)
    lrm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, PROMPTS[:3]), lrm(z, PROMPTS[:3]), rtol=0, atol=0)
    assert LatentRewardModel.from_pretrained(folder, trainable=True).logit_scale.requires_grad


def test_load_errors(tokenizer, tmp_path):
    lrm = small_lrm(tokenizer)
    folder = lrm.save_pretrained(tmp_path / "lrm")
    with pytest.raises(ModelLoadError, match="not found"):
        LatentRewardModel.from_pretrained(tmp_path / "nowhere")
    # strict: an extra or missing tensor is refused, naming the key
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="extra.weight"):
        LatentRewardModel.from_pretrained(folder)
    state.pop("logit_scale")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="logit_scale"):
        LatentRewardModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LatentRewardModel.from_pretrained(folder)


def test_shape_checks_name_both_shapes(tokenizer):
    lrm = small_lrm(tokenizer)
    lrm.check_compatible(4, 8)
    with pytest.raises(ConfigError, match=r"\[4, 8, 8\].*\[16, 32, 32\].*pretrain"):
        lrm.check_compatible(16, 32)
    with pytest.raises(ConfigError, match=r"\[4, 8, 8\].*\[3, 8, 8\]"):
        lrm(torch.randn(2, 3, 8, 8), PROMPTS[:2])
    with pytest.raises(ConfigError, match=r"\[4, 8, 8\].*\[4, 16, 16\]"):
        lrm(torch.randn(2, 4, 16, 16), PROMPTS[:2])
    with pytest.raises(ConfigError, match="tower"):
        LRMConfig(tower="mlp", vocab_size=10).validate()


# --------------------------------------------------------------------------- pre-training


def test_pretrain_rejects_unknown_data(tmp_path):
    # anything but `digits` is a path to image-caption data (fastgen.rewards.lrm_pretrain); a missing one is named
    with pytest.raises(DataError, match="'laion'.*digits"):
        pretrain_lrm(LRMPretrainConfig(data="laion", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_short_pretrain_on_digits_teacher(tmp_path):
    cfg = LRMPretrainConfig(out=str(tmp_path / "lrm"), steps=150, batch_size=64, lr=3e-3, width=32, depth=2,
                            embed_dim=32, log_every=20, train_sources=400)
    out = pretrain_lrm(cfg)
    for name in ("config.json", "model.safetensors", "tokenizer", "pretrain_metrics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["config"]["steps"] == 150 and metrics["wall_time_s"] > 0
    assert metrics["test_retrieval_accuracy"] > 0.2, metrics
    lrm = LatentRewardModel.from_pretrained(out)
    assert lrm.latent_shape == (4, 8, 8) and lrm.meta["teacher"] == "digits-sd"


def test_cli_parses_overrides(monkeypatch):
    import fastgen.rewards.latent_proxy as lp

    seen = {}
    monkeypatch.setattr(lp, "pretrain_lrm", lambda cfg: seen.update(cfg=cfg))
    assert lp.main(["pretrain", "--teacher", "digits-sd", "steps=7", "width=16"]) == 0
    assert seen["cfg"].steps == 7 and seen["cfg"].width == 16 and seen["cfg"].teacher == "digits-sd"
    assert seen["cfg"].data == "digits" and seen["cfg"].tower is None  # None: the preset's value
    assert lp.main(["pretrain", "--teacher", "t", "--data", "some/folder", "preset=tiny", "text_tower=open_clip"]) == 0
    assert (seen["cfg"].data, seen["cfg"].preset, seen["cfg"].text_tower) == ("some/folder", "tiny", "open_clip")
    assert lp.main(["pretrain", "stepz=7"]) == 2


@pytest.mark.slow
def test_full_default_pretrain(tmp_path):
    """The default pre-training (minutes on one CPU thread): test retrieval accuracy >= 0.9."""
    out = pretrain_lrm(LRMPretrainConfig(out=str(tmp_path / "lrm")))
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["test_retrieval_accuracy"] >= 0.9, metrics
