"""CLEAR attention in Flux transformers (fastgen.attention.flux / .unet) and the CLEAR method
(fastgen.trainers.clear), on tiny random Flux models and the shipped digits DiT.

Independent references: the stock diffusers ``FluxAttnProcessor`` given a mask built by hand with
Python loops (processor equivalence), the stock ``FluxTransformer2DModel`` (a window that covers
the whole grid), the teacher's own ``Teacher.forward`` (student conditioning conventions) and a
fresh Python process that loads the export with stock ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastgen.attention import BackendUnavailable, window_count, window_info
from fastgen.attention.flux import (
    ClearFluxAttnProcessor,
    ClearFluxTransformer2DModel,
    apply_clear,
    clear_grid,
    grid_from_img_ids,
)
from fastgen.errors import ConfigError
from fastgen.data.digits import balanced_captions as digits_data_prompts
from fastgen.trainers.clear import Clear, ClearConfig, aligned_processor_names, is_trainable_name
from fastgen.workflows.export import export_method
from tiny_models import build_method, make_tiny_flux

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "fastgen" / "recipes"
PROMPTS = ["a photo of a cat", "a blue car parked in the city at night"]
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def tiny_transformer(num_layers: int = 1, num_single_layers: int = 1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=12,
        axes_dims_rope=[2, 2, 4],
    ).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def transformer_inputs(height: int, width: int, text: int = 3, batch: int = 2) -> dict:
    return dict(
        hidden_states=torch.randn(batch, height * width, 8),
        encoder_hidden_states=torch.randn(batch, text, 12),
        pooled_projections=torch.randn(batch, 12),
        timestep=torch.rand(batch),
        img_ids=image_ids(height, width),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def hand_mask(height: int, width: int, text: int, radius: int) -> torch.Tensor:
    """The CLEAR predicate written out with loops: text rows and columns full, image disk r."""
    n = text + height * width
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if q < text or k < text:
                mask[q, k] = True
            else:
                yq, xq = divmod(q - text, width)
                yk, xk = divmod(k - text, width)
                mask[q, k] = (yq - yk) ** 2 + (xq - xk) ** 2 < radius**2
    return mask


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("clear-tiny") / "flux")


def make_method(folder, tmp_path, **kw) -> Clear:
    base = dict(
        teacher=str(folder), resolution=16, max_sequence_length=8, radius=2, align_every=1, data_samples=4,
        data_steps=2, data_batch_size=2, cache_dir=str(tmp_path / "cache"), sample_steps=3, eval_samples=0,
    )
    base.update(kw)
    return build_method(Clear, **base)


# --------------------------------------------------------------------------- processor


@pytest.mark.parametrize("double", [True, False])
def test_processor_equals_hand_masked_stock_attention(double):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_transformer()
    attn = (model.transformer_blocks[0] if double else model.single_transformer_blocks[0]).attn
    height, width, text, radius = 4, 5, 3, 2
    rope = model.pos_embed(torch.cat([torch.zeros(text, 3), image_ids(height, width)]))
    img = torch.randn(2, height * width, 16)
    enc = torch.randn(2, text, 16)
    mask = hand_mask(height, width, text, radius)
    assert not mask.all() and mask[text:, text:].sum() < (height * width) ** 2  # the window really masks

    clear = ClearFluxAttnProcessor(radius, backend="reference", record=True)
    with torch.no_grad():
        if double:
            ref = FluxAttnProcessor()(attn, img, enc, attention_mask=mask, image_rotary_emb=rope)
            with clear_grid(height, width):  # double blocks know the text length from encoder_hidden_states
                got = clear(attn, img, enc, image_rotary_emb=rope)
            full = FluxAttnProcessor()(attn, img, enc, image_rotary_emb=rope)
            for a, b in zip(got, ref):
                assert (a - b).abs().max() < 1e-5
            assert (full[0] - got[0]).abs().max() > 1e-3
        else:
            joint = torch.cat([enc, img], dim=1)
            ref = FluxAttnProcessor()(attn, joint, attention_mask=mask, image_rotary_emb=rope)
            with clear_grid(height, width, text_len=text):
                got = clear(attn, joint, image_rotary_emb=rope)
            assert (got - ref).abs().max() < 1e-5
            # the recorded tensor is the joint attention output (single blocks: the processor output)
            assert torch.equal(clear.pop_output(), got) and clear.last_output is None
            # without a grid context the processor needs the text length and infers a square grid only
            with pytest.raises(ConfigError, match="text length"):
                ClearFluxAttnProcessor(radius, backend="reference")(attn, joint, image_rotary_emb=rope)
            with pytest.raises(ConfigError, match="not a square"):
                ClearFluxAttnProcessor(radius, backend="reference", text_len=text)(attn, joint, image_rotary_emb=rope)
            fixed = ClearFluxAttnProcessor(radius, backend="reference", text_len=text, grid=(height, width))
            assert (fixed(attn, joint, image_rotary_emb=rope) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("grid", [(3, 3), (2, 4)])
def test_window_covering_the_grid_reproduces_the_stock_transformer(grid):
    height, width = grid
    radius = max(height, width)  # the largest radius validate_clear_config accepts
    assert radius**2 > (height - 1) ** 2 + (width - 1) ** 2  # ... and the disk covers every image token
    stock = tiny_transformer(num_layers=2, num_single_layers=2)
    x = transformer_inputs(height, width)
    clear = ClearFluxTransformer2DModel.from_flux(stock, radius=radius, backend="reference").eval()
    patched = copy.deepcopy(stock)
    names = apply_clear(patched, radius, backend="reference")
    assert names == list(stock.attn_processors) and len(names) == 4
    assert names[0].startswith("transformer_blocks.") and names[-1].startswith("single_transformer_blocks.")
    with torch.no_grad():
        ref = stock(**x)[0]
        assert (clear(**x)[0] - ref).abs().max() < 1e-5
        assert (patched(**x)[0] - ref).abs().max() < 1e-5  # a stock transformer gets the grid from a forward hook
        # a smaller window changes the output (the processors are really in use)
        small = ClearFluxTransformer2DModel.from_flux(stock, radius=1, backend="reference").eval()
        assert (small(**x)[0] - ref).abs().max() > 1e-4


def test_compiled_forward_with_token_grid_is_one_graph_and_equals_eager():
    """Under torch.compile the grid comes from token_grid (static ints) and the window mask is a graph constant:
    fullgraph=True traces the whole forward (a graph break would raise), on a non-square grid whose token count
    is also a square's (4 x 9 = 6 x 6), and the output equals the eager forward's (a wrong token_grid changes it).
    Without token_grid the compiled forward still reads img_ids (with a break) and is right."""
    clear = ClearFluxTransformer2DModel.from_flux(tiny_transformer(), radius=2, backend="reference").eval()
    x = transformer_inputs(4, 9)
    with torch.no_grad():
        ref = clear(**x)[0]
        torch._dynamo.reset()
        try:
            clear.token_grid = (4, 9)
            whole = torch.compile(clear, backend="eager", fullgraph=True)
            assert (whole(**x)[0] - ref).abs().max() < 1e-6
            clear.token_grid = None
            loose = torch.compile(clear, backend="eager")
            assert (loose(**x)[0] - ref).abs().max() < 1e-6
            torch._dynamo.reset()
            clear.token_grid = (6, 6)  # a wrong grid of the same size: the compiled forward really reads token_grid
            assert (torch.compile(clear, backend="eager", fullgraph=True)(**x)[0] - ref).abs().max() > 1e-4
            clear.token_grid = None
        finally:
            torch._dynamo.reset()


def test_grid_from_img_ids_and_errors():
    assert grid_from_img_ids(image_ids(3, 5)) == (3, 5)
    assert grid_from_img_ids(image_ids(3, 5)[None]) == (3, 5)
    with pytest.raises(ConfigError, match="raster"):
        grid_from_img_ids(image_ids(3, 5).flip(0))
    with pytest.raises(ConfigError, match="hidden_states"):
        grid_from_img_ids(image_ids(3, 5), 14)


def test_save_load_keeps_config_and_spatial_weights(tmp_path):
    stock = tiny_transformer()
    model = ClearFluxTransformer2DModel.from_flux(stock, radius=2, down_factor=2, backend="reference")
    weights = {n: p for n, p in model.named_parameters() if n.endswith("spatial_weight")}
    assert len(weights) == 2 and all(torch.allclose(p, torch.full((2, 2), 0.25)) for p in weights.values())
    with torch.no_grad():
        for p in weights.values():
            p.normal_()
    model.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["_class_name"] == "ClearFluxTransformer2DModel"
    assert (config["clear_radius"], config["clear_down_factor"], config["clear_backend"]) == (2, 2, "reference")
    loaded = ClearFluxTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    x = transformer_inputs(4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(**x)[0], model.eval()(**x)[0])
    assert all(torch.equal(dict(loaded.named_parameters())[n], p) for n, p in weights.items())


def test_non_integer_radius_saves_loads_and_masks_between_the_integer_windows(tmp_path):
    stock = tiny_transformer()
    x = transformer_inputs(5, 5)
    outs = {}
    for r in (2, 2.2, 3):
        model = ClearFluxTransformer2DModel.from_flux(stock, radius=r, backend="reference").eval()
        with torch.no_grad():
            outs[r] = model(**x)[0]
    model = ClearFluxTransformer2DModel.from_flux(stock, radius=2.2, backend="reference").eval()
    model.save_pretrained(tmp_path / "t22")
    assert json.loads((tmp_path / "t22" / "config.json").read_text())["clear_radius"] == 2.2
    loaded = ClearFluxTransformer2DModel.from_pretrained(tmp_path / "t22").eval()
    assert {p.radius for p in loaded.attn_processors.values()} == {2.2}
    with torch.no_grad():
        assert torch.equal(loaded(**x)[0], outs[2.2])
    # 13 keys: a different window from both 9 (r = 2) and 25 (r = 3)
    assert not torch.allclose(outs[2.2], outs[2], atol=1e-6) and not torch.allclose(outs[2.2], outs[3], atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_radius_larger_than_the_grid_is_a_config_error(flux_folder, tmp_path):
    model = ClearFluxTransformer2DModel.from_flux(tiny_transformer(), radius=5, backend="reference")
    with pytest.raises(ConfigError, match="larger than the 3x3 token grid"), torch.no_grad():
        model(**transformer_inputs(3, 3))
    with pytest.raises(ConfigError, match="larger than"):
        apply_clear(tiny_transformer(), 5, grid=(3, 3))
    with pytest.raises(ConfigError, match="larger than the 4x4"):
        make_method(flux_folder, tmp_path, radius=5)
    with pytest.raises(ConfigError, match="radius"):
        apply_clear(tiny_transformer(), 0)
    with pytest.raises(ConfigError, match="backend"):
        apply_clear(tiny_transformer(), 2, backend="cuda")


def test_models_without_flux_attention_are_rejected():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )
    with pytest.raises(ConfigError, match="UNet2DConditionModel.*FluxAttention"):
        apply_clear(unet, 2)
    with pytest.raises(ConfigError, match="Linear.*FluxAttention"):
        apply_clear(torch.nn.Linear(2, 2), 2)


def test_triton_on_cpu_without_interpreter_names_the_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = ClearFluxTransformer2DModel.from_flux(tiny_transformer(), radius=2, backend="triton")
    with pytest.raises(BackendUnavailable, match="backend='reference'"), torch.no_grad():
        model(**transformer_inputs(3, 3))


def test_unet_attention_sdpa_and_unavailable_xformers(monkeypatch):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from fastgen.attention.unet import set_unet_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        ref = unet(x, t, c).sample
    names = set_unet_attention(unet, "sdpa")
    assert names == list(unet.attn_processors) and names
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with torch.no_grad():
        assert (unet(x, t, c).sample - ref).abs().max() < 1e-5
    import diffusers.utils

    for available in (False, True):  # no package; or the package but no CUDA device
        monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda a=available: a)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(BackendUnavailable, match="backend='sdpa'"):
            set_unet_attention(unet, "xformers")
    with pytest.raises(ConfigError, match="sdpa"):
        set_unet_attention(unet, "flash")


# --------------------------------------------------------------------------- the method


def test_registered_and_alignment_index_rule():
    from fastgen.trainers.method import get_method

    assert get_method("clear") is Clear
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(19)]
    names += [f"single_transformer_blocks.{i}.attn.processor" for i in range(38)]
    aligned = aligned_processor_names(names, 4)
    # FLUX.1-dev: indices 20, 24, ..., 56 -> single blocks 1, 5, ..., 37 (10 layers)
    assert aligned == [f"single_transformer_blocks.{i}.attn.processor" for i in range(1, 38, 4)]
    assert aligned_processor_names(names, 0) == []
    assert is_trainable_name("transformer_blocks.0.attn.to_out.0.weight")
    assert not is_trainable_name("transformer_blocks.0.attn.to_add_out.weight")
    assert not is_trainable_name("transformer_blocks.0.attn.add_q_proj.weight")
    prompts = digits_data_prompts(120, seed=0)
    assert len(prompts) == 120 and len(set(prompts)) > 60


def test_only_image_stream_projections_train(flux_folder, tmp_path):
    m = make_method(flux_folder, tmp_path, down_factor=2)
    trainable = set(m.trainable_names())
    expected = set()
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        for proj in ("to_q", "to_k", "to_v"):
            expected |= {f"{block}.attn.{proj}.weight", f"{block}.attn.{proj}.bias"}
        expected.add(f"{block}.attn.processor.spatial_weight")
    expected |= {"transformer_blocks.0.attn.to_out.0.weight", "transformer_blocks.0.attn.to_out.0.bias"}
    assert trainable == expected
    frozen = [n for n, p in m.student.named_parameters() if not p.requires_grad]
    assert any("add_q_proj" in n for n in frozen) and any("norm_q" in n for n in frozen)
    assert any("proj_mlp" in n for n in frozen) and any("ff." in n for n in frozen)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    group = m.parameter_groups()["student"]
    assert {id(p) for p in group} == {id(p) for n, p in m.student.named_parameters() if n in expected}
    # the checkpoint holds the trained tensors only, and restores them
    state = m.checkpoint_state_dict()
    assert set(state) == {f"student.{n}" for n in expected}
    other = make_method(flux_folder, tmp_path, down_factor=2)
    changed = {k: v + 1.0 for k, v in state.items()}
    other.load_checkpoint_state_dict(changed)
    assert all(torch.equal(dict(other.student.named_parameters())[k[8:]], v) for k, v in changed.items())


def test_student_matches_teacher_conventions_and_loss_parts(flux_folder, tmp_path):
    m = make_method(flux_folder, tmp_path)
    assert m.grid == (4, 4) and m.aligned == ["single_transformer_blocks.0.attn.processor"]
    x = torch.randn(2, 4, 8, 8)
    sigma, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 4, 8, 8)
    e = m.encode(PROMPTS)
    with torch.no_grad():
        # the student forward uses the teacher's conventions: run it on the teacher network
        student_way = m.teacher.forward(x, sigma, e, guidance_embed=m.guidance, net=m.teacher.net)
        assert torch.equal(student_way, m.teacher.forward(x, sigma, e))
    out = m.compute_loss(x, e, sigma, noise)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1) * noise
    assert torch.allclose(out["x_t"], x_t)
    fm = ((out["v_student"] - (noise - x)) ** 2).mean()
    kd = ((out["v_student"] - out["v_teacher"]) ** 2).mean()
    assert torch.allclose(out["fm"], fm) and torch.allclose(out["kd"], kd)
    assert out["attn"] > 0 and torch.allclose(out["loss"], fm + 0.5 * kd + 0.5 * out["attn"])
    # nothing stays recorded after the step
    procs = [net.attn_processors[n] for net in (m.student, m.teacher.net) for n in m.aligned]
    assert procs and all(p.last_output is None and not p.record for p in procs)
    assert m.student.token_grid is None  # the teacher wrapper sets the grid hint around each call only
    # the scheduler's (static, shift 1) sigmas are U(0, 1]
    s = m.teacher.schedule.training_sigma(1.0 - torch.rand(4000))
    assert 0.0 < float(s.min()) and float(s.max()) <= 1.0 and abs(float(s.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("fm_weight", [1.0, 0.0])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(flux_folder, tmp_path, fm_weight):
    """The full loss, and the distillation part alone (kd + attn: the local-attention student moves towards
    the full-attention teacher)."""
    m = make_method(flux_folder, tmp_path, radius=1, fm_weight=fm_weight)
    torch.manual_seed(1)
    x, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.9])
    e = m.encode(PROMPTS * 2)
    opt = torch.optim.AdamW(m.parameter_groups()["student"], lr=1e-2)
    losses = []
    for _ in range(10):
        out = m.compute_loss(x, e, sigma, noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < (0.9 if fm_weight else 0.5) * losses[0], losses


def test_teacher_data_cache_is_built_once_and_reused(flux_folder, tmp_path):
    m = make_method(flux_folder, tmp_path, data_prompts=None)
    with pytest.raises(ConfigError, match="data.prompts"):
        m.train_dataset()
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    m = make_method(flux_folder, tmp_path, data_prompts=str(prompt_file), data_samples=3)
    ds = m.train_dataset()
    assert len(ds) == 3 and ds[0]["latents"].shape == (4, 8, 8) and ds[2]["caption"] == PROMPTS[0]
    (folder,) = [p.parent for p in (tmp_path / "cache").glob("*/prompts.json")]
    assert (folder / "latents.safetensors").is_file() and json.loads((folder / "prompts.json").read_text())["steps"] == 2
    # the cached latents are the teacher pipeline's own outputs (batch i seeded seed + i)
    from fastgen.models.teacher import pack_latents

    pipe = m.teacher.pipeline()
    kw = m.pipeline_kwargs(2)
    tokens = pipe(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert torch.allclose(pack_latents(ds.latents[:2]), tokens, atol=1e-6)
    # a second method with the same settings reads the cache instead of sampling
    again = make_method(flux_folder, tmp_path, data_prompts=str(prompt_file), data_samples=3)
    import fastgen.trainers.clear as clear_module

    real = clear_module.generate_with_pipeline
    clear_module.generate_with_pipeline = lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
    try:
        assert torch.equal(again.train_dataset().latents, ds.latents)
    finally:
        clear_module.generate_with_pipeline = real
    # train_step runs on a collated batch
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    step = again.train_step(batch, 0)
    assert step.losses["student"].requires_grad and set(step.logs) >= {"loss/fm", "loss/kd", "loss/attn"}


FRESH = r"""
import json, sys
import fastgen
heavy = "diffusers" in sys.modules or "torch" in sys.modules
import torch
from diffusers import DiffusionPipeline

folder, out, prompts, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
info = json.load(open(folder + "/fastgen_export.json"))
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
kw = dict(height=info["resolution"], width=info["resolution"], max_sequence_length=info["max_sequence_length"],
          guidance_scale=info["guidance_scale"])
if info["true_cfg_scale"] > 1:
    kw.update(true_cfg_scale=info["true_cfg_scale"], negative_prompt=[info["negative_prompt"]] * len(prompts))
images = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="pt", **kw).images
torch.save(images, out)
t = pipe.transformer
print(json.dumps({
    "import_fastgen_is_light": not heavy,
    "transformer": type(t).__name__,
    "module": type(t).__module__,
    "backend": t.config.clear_backend,
    "radius": t.config.clear_radius,
    "processors": sorted({type(p).__name__ for p in t.attn_processors.values()}),
    "spatial_weight_sum": float(sum(p.sum() for n, p in t.named_parameters() if n.endswith("spatial_weight"))),
}))
"""


def test_export_round_trip_in_a_fresh_process(flux_folder, tmp_path):
    m = make_method(flux_folder, tmp_path, down_factor=2, data_guidance=3.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking student that differs from the teacher
        for p in m.parameter_groups()["student"]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = export_method(m, tmp_path / "export", {"metrics": {"digits_fid": 1.0}})
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["fastgen", "ClearFluxTransformer2DModel"] and index["_class_name"] == "FluxPipeline"
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "ClearFluxTransformer2DModel"
    info = json.loads((out / "fastgen_export.json").read_text())
    assert info["method"] == "clear" and info["radius"] == 2 and info["resolution"] == 16
    assert info["window_tokens"] == window_count(2) == 9 and info["window_fraction"] == 9 / 16
    # the 4x4 grid pooled in 2x2 cells: 4 more keys for every image query
    assert info["pooled_tokens"] == 4 and info["image_query_keys"] == 13 and info["image_query_key_fraction"] == 13 / 16
    assert "4 pooled KV tokens" in (out / "README.md").read_text()
    assert (info["guidance_scale"], info["true_cfg_scale"], info["negative_prompt"]) == (1.0, 3.0, "")
    assert "import fastgen" in (out / "README.md").read_text()
    from fastgen.pipelines.sampling import export_call_kwargs  # what `fastgen sample` adds to the pipeline call

    assert export_call_kwargs(info, 2) == {"max_sequence_length": 8, "true_cfg_scale": 3.0, "negative_prompt": ["", ""]}

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), str(tmp_path / "images.pt"), json.dumps(PROMPTS), "3"],
        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["import_fastgen_is_light"], got
    assert got["transformer"] == "ClearFluxTransformer2DModel" and got["module"] == "fastgen.attention.flux"
    assert (got["backend"], got["radius"], got["processors"]) == ("auto", 2, ["ClearFluxAttnProcessor"])
    sw = sum(float(p.detach().sum()) for n, p in m.student.named_parameters() if n.endswith("spatial_weight"))
    assert abs(got["spatial_weight_sum"] - sw) < 1e-5

    images = torch.load(tmp_path / "images.pt", weights_only=True)
    ours = m.sample(PROMPTS, 3, torch.Generator().manual_seed(7))
    assert images.shape == ours.shape == (2, 3, 16, 16)
    assert (images - ours).abs().max() < TOL
    # not vacuous: the teacher gives other images for the same noise
    teacher_pipe = m.teacher.pipeline()
    teacher_pipe.set_progress_bar_config(disable=True)
    teacher = teacher_pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="pt",
                           **m.pipeline_kwargs(2)).images
    assert (teacher - ours).abs().max() > 100 * TOL


# --------------------------------------------------------------------------- digits DiT and recipes


def test_digits_dit_defaults():
    from fastgen.zoo import paths

    try:
        paths.flux_teacher()
    except Exception:
        pytest.skip("digits DiT artefact not built")
    m = build_method(Clear, eval_samples=0, radius=2)
    assert m.is_digits_world() and m.grid == (8, 8) and m.resolution == paths.DIT_RESOLUTION == 32
    assert m.max_sequence_length == paths.DIT_MAX_SEQUENCE_LENGTH
    assert m.guidance_mode == "true_cfg" and m.guidance == paths.DIT_GUIDANCE
    kw = m.pipeline_kwargs(3)
    assert kw["true_cfg_scale"] == paths.DIT_GUIDANCE and kw["negative_prompt"] == [""] * 3 and kw["guidance_scale"] == 1.0
    info = m.attention_info()
    assert info["window_tokens"] == 9 and info["window_fraction"] == round(9 / 64, 6) and 9 / 64 <= 0.25
    # 3 double + 6 single blocks (processor indices 0..8): align_every=4 aligns indices 4 and 8
    assert m.aligned == aligned_processor_names(list(m.student.attn_processors), 4) == [
        "single_transformer_blocks.1.attn.processor", "single_transformer_blocks.5.attn.processor"]


@pytest.mark.parametrize("name", ["clear-digits", "clear-digits-r1", "clear-flux-dev"])
def test_recipes_parse(name):
    from fastgen.config import config_from_dict
    from fastgen.trainers.engine.run import load_run_config

    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert recipe["method"] == "clear" and recipe["output_dir"]
    cfg = config_from_dict(ClearConfig, recipe["clear"])
    run_cfg, method_cls = load_run_config(str(RECIPES / f"{name}.yaml"))
    assert method_cls is Clear and run_cfg.clear == cfg
    if name.startswith("clear-digits"):  # the 8x8 image tokens of the digits DiT: local + pooled keys <= 25%
        info = window_info(8, 8, 32, cfg.radius, cfg.down_factor)
        assert info["image_query_key_fraction"] <= 0.25 and info["image_query_keys"] == info["window_tokens"] + info["pooled_tokens"]
        if name == "clear-digits":
            assert (info["window_tokens"], info["pooled_tokens"]) == (13, 1)
    if name == "clear-flux-dev":
        assert cfg.radius == 16 and run_cfg.teacher.resolution == 1024 and run_cfg.data.num_samples == 10000
        assert cfg.backend == "flex" and run_cfg.data.source == "teacher-samples"
        assert run_cfg.train.max_steps == 10000 and run_cfg.train.mixed_precision == "bf16"
        assert run_cfg.train.batch_size * run_cfg.train.gradient_accumulation_steps * 4 == 32


def test_training_sigmas_of_a_dynamic_shift_teacher_are_the_unshifted_grid(flux_folder, tmp_path):
    """FLUX.1-dev's scheduler shifts by resolution at sampling time only; CLEAR's training draws a uniform
    index into the unshifted training timesteps (P(sigma > 0.5) ~ 0.5, not ~0.76 as with mu = 1.15)."""
    import shutil

    folder = tmp_path / "flux-dev-shaped"
    shutil.copytree(flux_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096, shift=3.0, num_train_timesteps=1000, time_shift_type="exponential")
    path.write_text(json.dumps(config))
    m = make_method(folder, tmp_path)
    seen = []
    m.compute_loss = lambda latents, embeds, sigma, noise: seen.append(sigma) or {
        "loss": torch.zeros((), requires_grad=True), "fm": torch.zeros(()), "kd": torch.zeros(()), "attn": torch.zeros(())}
    n = 3000
    m.train_step({"latents": torch.zeros(n, 4, 8, 8), "caption": [""] * n}, 0)
    sigma = seen[0]
    grid = torch.linspace(1, 1000, 1000)[None] / 1000
    assert abs(float((sigma > 0.5).float().mean()) - 0.5) < 0.04  # 4.4 standard errors; the shifted draw is 0.76
    assert float((sigma[:, None] - grid).abs().min(dim=1).values.max()) < 1e-6  # on the training grid
