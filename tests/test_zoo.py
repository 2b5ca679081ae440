"""The digits world's models: the build path (quick mode), and the shipped teachers' quality."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fastgen.data import digits as dw
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.zoo import build as zb
from fastgen.zoo import paths

STOCK_SNIPPET = textwrap.dedent(
    """
    import sys, torch
    assert "fastgen" not in sys.modules
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    if type(pipe).__name__ == "FluxPipeline":  # the stock default T5 length (512): no max_sequence_length
        kw.update(height=32, width=32, negative_prompt="", true_cfg_scale=1.5)
    else:
        kw.update(height=32, width=32, guidance_scale=3.0)
    img = pipe(["a red handwritten digit three", "a blue handwritten digit eight"], **kw).images
    assert "fastgen" not in sys.modules
    print(type(pipe).__name__, img.shape, float(img.std()))
    """
)


def _run_stock(folder) -> str:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    res = subprocess.run([sys.executable, "-c", STOCK_SNIPPET, str(folder)], capture_output=True, text=True, env=env,
                         cwd="/", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Expected types" not in res.stderr, res.stderr[-3000:]  # every component is of the class its slot expects
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.ci
def test_quick_build_makes_loadable_pipelines_and_resumes(tmp_path):
    cfg = zb.BuildConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), quick=True)
    info = zb.build(cfg)
    assert set(info["done"]) == set(zb.STAGES)
    for name in ("sd-digits", "flux-digits", "classifier"):
        assert (tmp_path / "out" / name).is_dir()
    line = _run_stock(tmp_path / "out" / "sd-digits")
    assert line.startswith("StableDiffusionPipeline (2, 32, 32, 3)")
    line = _run_stock(tmp_path / "out" / "flux-digits")
    assert line.startswith("FluxPipeline (2, 32, 32, 3)")
    # a second build reuses every finished stage: the stage weights are not rewritten
    unet_file = next((tmp_path / "work" / "unet").glob("*.safetensors"))
    mtime = unet_file.stat().st_mtime_ns
    zb.build(cfg)
    assert unet_file.stat().st_mtime_ns == mtime
    # ... unless asked to rebuild it
    zb.build(cfg, rebuild=("unet",))
    assert next((tmp_path / "work" / "unet").glob("*.safetensors")).stat().st_mtime_ns != mtime


def test_dit_stage_resumes_exactly_from_its_checkpoint(tmp_path, monkeypatch):
    """A DiT stage killed after a checkpoint and run again ends with the weights of an uninterrupted run."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(paths.flux_teacher(), local_files_only=True)
    parts = (pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    cfg = zb.BuildConfig(quick=True, dit_batch=4, dit_checkpoint_every=2)
    cfg.steps.dit = 5
    whole, _ = zb.build_dit(tmp_path / "whole" / "dit", *parts, cfg)

    real_save = zb._save_dit_checkpoint

    def save_then_die(path, step, *args):
        real_save(path, step, *args)
        if step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    monkeypatch.setattr(zb, "_save_dit_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        zb.build_dit(tmp_path / "cut" / "dit", *parts, cfg)
    assert (tmp_path / "cut" / "dit.checkpoint" / "ema.safetensors").is_file()
    resumed, stats = zb.build_dit(tmp_path / "cut" / "dit", *parts, cfg)
    assert stats["resumed_at"] == 4 and not (tmp_path / "cut" / "dit.checkpoint").exists()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_build_rejects_unknown_stage(tmp_path):
    cfg = zb.BuildConfig(out_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"), quick=True)
    with pytest.raises(ValueError, match="unknown zoo stage"):
        zb.build(cfg, rebuild=("unett",))


def test_cli_unknown_override_suggests_key(capsys):
    from fastgen.cli import main

    rc = main(["zoo", "build", "--quick", "--work-dir", "/nonexistent", "steps.unett=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "steps.unett" in err and "steps.unet" in err and "did you mean" in err


def test_missing_artifact_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="fastgen zoo build"):
        paths.sd_teacher(tmp_path)


def test_tokenizer_covers_the_caption_vocabulary(tmp_path):
    tok = zb.build_tokenizer(tmp_path / "tok")
    ids = tok("a magenta handwritten digit seven").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1] or tok.unk_token_id == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a magenta handwritten digit seven"


def test_shipped_world_facts_live_in_paths():
    facts = dict(UNET_RESOLUTION=32, DIT_RESOLUTION=32, DIT_MAX_SEQUENCE_LENGTH=32, UNET_GUIDANCE=3.0, DIT_GUIDANCE=1.5)
    for name, value in facts.items():
        assert getattr(paths, name) == value
        assert getattr(zb, name) is getattr(paths, name)  # build re-exports them (``build.X`` keeps working)


def test_teacher_ema_keeps_the_build_decay_warmup():
    """The project EMA as the teachers use it: the k-th update has decay min(d, (1 + k) / (10 + k)), k from 1."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay = 0.6  # small, so that both the warm-up (k <= 5: 2/11 .. 6/15) and the cap are exercised
    ema = zb.teacher_ema(net, decay)
    expected = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for k in range(1, 12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(decay, (1 + k) / (10 + k))
        for name, v in net.state_dict().items():
            expected[name] = d * expected[name] + (1 - d) * v
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema.copy_to(fresh)
    for name, v in fresh.state_dict().items():
        assert torch.allclose(v, expected[name], atol=1e-6, rtol=0), name


def test_teacher_noising_and_targets_match_the_schedulers():
    from diffusers import DDIMScheduler

    from fastgen.diffusion import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ddim = zb.make_ddim_scheduler()
    assert isinstance(ddim, DDIMScheduler)
    x_t, target = zb._noised_and_target(NoiseSchedule.from_scheduler_config(ddim), x0, eps, t)
    assert (x_t - ddim.add_noise(x0, eps, t)).abs().max() <= 1e-6
    assert torch.equal(target, eps)
    # the flow DiT: x_t = (1 - s) x0 + s eps bit for bit, target eps - x0
    x0, eps = torch.randn(4, 256, 16, generator=g), torch.randn(4, 256, 16, generator=g)
    sigma = torch.sigmoid(torch.randn(4, generator=g))
    x_t, target = zb._noised_and_target(NoiseSchedule.from_scheduler_config(zb.make_flow_scheduler()), x0, eps, sigma)
    s = sigma[:, None, None]
    assert torch.equal(x_t, (1 - s) * x0 + s * eps)
    assert torch.equal(target, eps - x0)


def test_save_folder_replaces_atomically(tmp_path):
    net = torch.nn.Linear(2, 2)

    class Saver:
        def __init__(self, fail=False):
            self.fail = fail

        def save_pretrained(self, folder, **kwargs):
            torch.save(net.state_dict(), folder / "weights.pt")
            (folder / "kwargs.json").write_text(json.dumps(kwargs))
            if self.fail:
                raise RuntimeError("disk full")

    target = tmp_path / "stage"
    zb._save_folder(Saver(), target, safe_serialization=True)
    assert json.loads((target / "kwargs.json").read_text()) == {"safe_serialization": True}
    (target / "old-only.txt").write_text("x")
    zb._save_folder(Saver(), target)
    assert not (target / "old-only.txt").exists()  # replaced, not merged
    with pytest.raises(RuntimeError, match="disk full"):
        zb._save_folder(Saver(fail=True), target)
    assert json.loads((target / "kwargs.json").read_text()) == {}  # the previous complete folder is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp folders left behind


# ---------------------------------------------------------------------------------------------
# the shipped models


def test_shipped_teachers_run_in_stock_diffusers_without_fastgen():
    line = _run_stock(paths.sd_teacher())
    assert line.startswith("StableDiffusionPipeline (2, 32, 32, 3)")
    assert float(line.split()[-1]) > 0.05  # not a blank image
    line = _run_stock(paths.flux_teacher())
    assert line.startswith("FluxPipeline (2, 32, 32, 3)")
    assert float(line.split()[-1]) > 0.05


def test_shipped_dit_folder_has_flux_text_towers():
    """FLUX's layout: CLIP (pooled) in text_encoder, a T5 encoder + T5 tokenizer in text_encoder_2 / tokenizer_2."""
    from diffusers import FluxPipeline

    index = json.loads((paths.flux_teacher() / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_2"][1].startswith("T5Tokenizer")
    pipe = FluxPipeline.from_pretrained(paths.flux_teacher(), local_files_only=True)
    # a caption's T5 tokens read (almost) the same whatever the number of pads after them
    ids = {n: pipe.tokenizer_2(["a red handwritten digit seven"], padding="max_length", max_length=n,
                               return_tensors="pt").input_ids for n in (16, 512)}
    with torch.no_grad():
        short, long = (pipe.text_encoder_2(ids[n])[0][0, :6] for n in (16, 512))
    assert (short - long).abs().max() < 0.25 * short.abs().mean()


def test_t5_tokenizer_keeps_caption_words_whole(tmp_path):
    from fastgen.zoo.t5 import build_t5_tokenizer

    tok = build_t5_tokenizer(tmp_path / "t5")
    for caption in dw.all_captions()[:: len(dw.PALETTE) + 1]:
        pieces = tok.tokenize(caption)
        assert len(pieces) == len(caption.split()) and all(p.startswith("▁") for p in pieces), (caption, pieces)
    ids = tok("a cat, drawn!").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids  # any lowercase text tokenizes


def test_shipped_classifier_and_vae_are_good():
    clf = paths.load_classifier()
    acc = zb.classifier_accuracy(clf, "test")
    assert acc["digit_accuracy"] >= 0.9 and acc["colour_accuracy"] >= 0.99
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(paths.sd_teacher() / "vae")
    assert zb.vae_psnr(vae, 32, limit=256) >= 25.0
    vae_f2 = AutoencoderKL.from_pretrained(paths.flux_teacher() / "vae")
    assert zb.vae_psnr(vae_f2, zb.DIT_RESOLUTION, limit=256) >= 35.0


@pytest.mark.slow
@pytest.mark.ci
def test_shipped_unet_teacher_draws_the_prompted_digit():
    from fastgen.zoo.check import load_sd_pipeline, sample_unet_teacher

    pipe = load_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, digits, colours = dw.eval_prompts(120, seed=11)
    images = sample_unet_teacher(pipe, prompts, steps=50, seed=11)
    d_logits, c_logits, _ = paths.load_classifier()(images)
    assert (d_logits.argmax(1) == digits).float().mean() >= 0.9
    assert (c_logits.argmax(1) == colours).float().mean() >= 0.9


@pytest.mark.slow
@pytest.mark.ci
def test_shipped_dit_teacher_draws_the_prompted_digit():
    from fastgen.zoo.check import load_flux_pipeline, sample_dit_teacher

    pipe = load_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, digits, colours = dw.eval_prompts(60, seed=12)
    images = sample_dit_teacher(pipe, prompts, steps=50, seed=12)
    assert images.shape == (60, 3, zb.DIT_RESOLUTION, zb.DIT_RESOLUTION)
    d_logits, c_logits, _ = paths.load_classifier()(images)
    assert (d_logits.argmax(1) == digits).float().mean() >= 0.9
    assert (c_logits.argmax(1) == colours).float().mean() >= 0.9


def test_check_grids_reuse_the_scored_samples_when_they_cover_every_pair():
    """`fastgen zoo check` (and the demo) draw each teacher's grid from its scored samples: one image per
    (colour, digit) pair in grid_prompts() order; too few samples to cover every pair: None (sampled then)."""
    from fastgen.zoo.check import grid_from_samples, grid_prompts

    prompts, digits, colours = dw.eval_prompts(130, seed=3)
    images = torch.arange(130).float()[:, None, None, None].expand(130, 3, 2, 2)
    grid = grid_from_samples(images, digits, colours)
    gp, nrow = grid_prompts()
    assert grid.shape == (60, 3, 2, 2) and nrow == 10
    picked = [prompts[int(i)] for i in grid[:, 0, 0, 0]]
    assert picked == gp  # the image of each cell was sampled for that cell's prompt
    assert grid_from_samples(images[:30], digits[:30], colours[:30]) is None
