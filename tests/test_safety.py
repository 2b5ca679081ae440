"""Folder safety and safe resume.

* fastgen writes into a folder only if it is absent, empty, or one it made for the same purpose
  (run folder, export, latent cache); ``--overwrite`` replaces only an earlier export, never a run
  folder, never the run being exported, never a folder holding files fastgen did not write;
* a resume refuses changes of keys that alter the optimisation (unless allowed by name, then
  recorded in config-changes.jsonl; config.yaml keeps the original);
* a corrupt file in the latest checkpoint is named, and ``--resume previous`` continues from the
  finished checkpoint before it.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
import yaml

import toy_method  # noqa: F401  (registers the "toy" method)
from fastgen import io as fio
from fastgen.data.cache import EmbeddingCache, cache_key
from fastgen.errors import ConfigError, DataError
from fastgen.pipelines.writer import ExportError, ExportExistsError, ExportPlan, write_pipeline
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine import run as trun
from fastgen.workflows import train as wf_train
from fastgen.workflows.export import export_run
from test_trainer import final_weights, max_diff, run_inprocess, write_recipe
from toy_method import toy_evaluator


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class TinyLoraPipeline:
    """Stands in for a diffusers pipeline class in a LoRA export plan (writes the weights file only)."""

    @classmethod
    def save_lora_weights(cls, folder, unet_lora_layers, unet_lora_adapter_metadata=None, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({f"unet.{k}": v for k, v in unet_lora_layers.items()}, os.path.join(folder, "pytorch_lora_weights.safetensors"))


def small_plan() -> ExportPlan:
    return ExportPlan(kind="lora", base=TinyLoraPipeline(), lora_weights={"w": torch.ones(2)}, info={"method": "tiny"})


# --------------------------------------------------------------------------- run folders


def test_training_into_a_folder_fastgen_did_not_make_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: own settings\n")
    (mine / "notes" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(mine)
    recipe = write_recipe(tmp_path / "r.yaml", mine, {"max_steps": 2})
    with pytest.raises(ConfigError) as info:
        trun.prepare_run(recipe)
    msg = str(info.value)
    assert str(mine) in msg and "config.yaml" in msg and "not made by fastgen" in msg
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes"]
    assert wf_train.main([str(recipe), "--import", "toy_method"]) == 2
    assert "not made by fastgen" in capsys.readouterr().err
    assert snapshot(mine) == before

    # an export is not a run folder either
    export = tmp_path / "export"
    write_pipeline(small_plan(), export)
    with pytest.raises(ConfigError, match="exported pipeline folder, not a training run folder"):
        trun.prepare_run(write_recipe(tmp_path / "e.yaml", export, {"max_steps": 2}))

    # accepted: an empty folder, and a run folder written before the marker existed (config.yaml with
    # `method:` and checkpoints/, nothing finished yet); both get the marker
    empty = tmp_path / "empty"
    empty.mkdir()
    run_inprocess(tmp_path, "empty", {"max_steps": 2})
    assert fio.read_folder_marker(empty)["kind"] == "run"
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.yaml").write_text("method: toy\ntrain:\n  max_steps: 2\n")
    assert fio.folder_kind(old) == "run"
    trainer = run_inprocess(tmp_path, "old", {"max_steps": 2})
    assert trainer.step == 2 and fio.read_folder_marker(old)["kind"] == "run"


def _deny_writes_under(folder: Path):
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.realpath(path) == os.path.realpath(folder):
            return False
        return real(path, mode, *args, **kwargs)

    return access


def test_unwritable_output_folder_is_a_clear_error(tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", parent / "run", {"max_steps": 2})
    # permission bits say no (as root they are ignored, so os.access is told what a normal user sees)
    monkeypatch.setattr(os, "access", _deny_writes_under(parent))
    with pytest.raises(ConfigError) as info:
        trun.prepare_run(recipe)
    msg = str(info.value)
    assert str(parent / "run") in msg and "not writable" in msg and "choose a folder you can write to" in msg
    with pytest.raises(ExportError, match="not writable"):
        write_pipeline(small_plan(), parent / "export")
    with pytest.raises(DataError, match="not writable"):
        EmbeddingCache(parent / "cache").build(*_cache_inputs(), batch_size=2, key="k")
    monkeypatch.undo()
    assert list(parent.iterdir()) == []

    # the file system refuses although the permission bits allow it (read-only mount, root squash)
    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(ConfigError) as info:
        trun.prepare_run(recipe)
    assert str(parent / "run") in str(info.value) and "Permission denied" in str(info.value)


def test_read_only_parent_folder_with_chmod(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        recipe = write_recipe(tmp_path / "r.yaml", parent / "run", {"max_steps": 2})
        with pytest.raises(ConfigError, match="not writable"):
            trun.prepare_run(recipe)
        with pytest.raises(ExportError, match="not writable"):
            write_pipeline(small_plan(), parent / "export")
    finally:
        parent.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------- exports


def test_export_never_replaces_the_run_being_exported(tmp_path):
    run_dir = run_inprocess(tmp_path, "run", {"max_steps": 2}).run_dir
    before = snapshot(run_dir)
    for out in (run_dir, run_dir / "export", tmp_path):
        with pytest.raises(ExportError, match="writing there could destroy it"):
            export_run(run_dir, out, overwrite=True)
        with pytest.raises(ExportError, match="writing there could destroy it"):
            write_pipeline(small_plan(), out, overwrite=True, protect=[run_dir])
    # a run folder is never an export to replace, whoever asks
    with pytest.raises(ExportError, match="is a fastgen training run folder, not an exported pipeline folder"):
        write_pipeline(small_plan(), run_dir, overwrite=True)
    assert snapshot(run_dir) == before
    assert not (run_dir / "export").exists()


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    out = tmp_path / "out"
    write_pipeline(small_plan(), out)
    marker = fio.read_folder_marker(out)
    assert marker["kind"] == "export" and marker["files"] == ["fastgen_export.json", "pytorch_lora_weights.safetensors"]
    with pytest.raises(ExportExistsError, match="--overwrite"):
        write_pipeline(small_plan(), out)
    write_pipeline(small_plan(), out, overwrite=True)

    # a file fastgen did not write: refused, named, left alone (top level and inside a component folder)
    for rel in ("notes.txt", "unet/extra.bin"):
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_text("mine")
        before = snapshot(out)
        with pytest.raises(ExportError, match=f"files fastgen did not write there \\('{rel}'\\)"):
            write_pipeline(small_plan(), out, overwrite=True)
        assert snapshot(out) == before
        (out / rel).unlink()

    # an export written before the marker existed is recognised and may be replaced ...
    legacy = tmp_path / "legacy"
    (legacy / "unet").mkdir(parents=True)
    (legacy / "fastgen_export.json").write_text("{}")
    (legacy / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (legacy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (legacy / "README.md").write_text("card")
    (legacy / "photo.png").write_bytes(b"png")
    with pytest.raises(ExportError, match="'photo.png'"):  # ... unless it holds a foreign file
        write_pipeline(small_plan(), legacy, overwrite=True)
    assert (legacy / "photo.png").read_bytes() == b"png"
    (legacy / "photo.png").unlink()
    write_pipeline(small_plan(), legacy, overwrite=True)
    assert fio.read_folder_marker(legacy)["kind"] == "export" and not (legacy / "unet").exists()

    # a folder of the user's files is never replaced, even with --overwrite; an empty one is used
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"cat")
    with pytest.raises(ExportError, match="not made by fastgen.*'cat.png'"):
        write_pipeline(small_plan(), photos, overwrite=True)
    assert snapshot(photos) == {"cat.png": b"cat"}
    (tmp_path / "empty").mkdir()
    write_pipeline(small_plan(), tmp_path / "empty")
    assert (tmp_path / "empty" / "pytorch_lora_weights.safetensors").is_file()


# --------------------------------------------------------------------------- caches


def _cache_inputs():
    items = [{"pixels": torch.full((3, 4, 4), float(i)), "caption": f"item {i}", "index": i} for i in range(4)]
    return items, (lambda pixels: pixels.mean(1, keepdim=True)), (lambda captions: {"emb": torch.ones(len(captions), 2)})


def test_cache_build_refuses_files_it_did_not_write(tmp_path):
    data, enc_img, enc_txt = _cache_inputs()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not made by fastgen.*'notes.txt'"):
        EmbeddingCache(mine).build(data, enc_img, enc_txt, batch_size=2, key=cache_key("a"), overwrite=True)
    assert snapshot(mine) == {"notes.txt": b"keep me"}

    root = tmp_path / "cache"
    EmbeddingCache(root).build(data, enc_img, enc_txt, batch_size=2, key=cache_key("a"))
    assert fio.read_folder_marker(root)["kind"] == "cache"
    EmbeddingCache(root).build(data, enc_img, enc_txt, batch_size=2, key=cache_key("b"), overwrite=True)
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="'notes.txt'"):
        EmbeddingCache(root).build(data, enc_img, enc_txt, batch_size=2, key=cache_key("c"), overwrite=True)
    assert (root / "notes.txt").read_text() == "keep me" and EmbeddingCache(root).read_index()["key"] == cache_key("b")
    run_dir = run_inprocess(tmp_path, "run", {"max_steps": 1}).run_dir
    with pytest.raises(DataError, match="training run folder, not a latent cache folder"):
        EmbeddingCache(run_dir).build(data, enc_img, enc_txt, batch_size=2, key=cache_key("a"), overwrite=True)


# --------------------------------------------------------------------------- resume: configuration changes


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "config-changes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_resume_refuses_optimisation_changes_unless_allowed_and_records_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = write_recipe(tmp_path / "a.yaml", run_dir, {"max_steps": 4, "checkpoint_every": 2}, {"dropout": 0.1})
    trun.prepare_run(first)[0].train()
    original = (run_dir / "config.yaml").read_bytes()

    changed = write_recipe(tmp_path / "b.yaml", run_dir, {"max_steps": 6, "checkpoint_every": 2, "learning_rate": 0.02}, {"dropout": 0.3})
    with pytest.raises(ConfigError) as info:
        trun.prepare_run(changed, [], "latest")
    msg = str(info.value)
    assert "toy.dropout: 0.1 -> 0.3" in msg and "train.learning_rate: 0.01 -> 0.02" in msg
    assert "--allow-config-change" in msg and "train.max_steps" not in msg
    with pytest.raises(ConfigError) as info:  # allowing one of the two is not enough
        trun.prepare_run(changed, [], "latest", allow_config_change=["toy.dropout"])
    assert "train.learning_rate" in str(info.value) and "toy.dropout" not in str(info.value)
    assert wf_train.main([str(changed), "--import", "toy_method", "--resume", "latest"]) == 2
    assert "toy.dropout: 0.1 -> 0.3" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == original and _records(run_dir) == []

    # allowed by name on the command line: trains on, recorded with the step, config.yaml untouched
    args = wf_train.build_parser().parse_intermixed_args(["r.yaml", "--resume", "--allow-config-change", "toy.dropout", "train.max_steps=3"])
    assert args.resume == "latest" and wf_train.split_allowed_changes(args) == (["train.max_steps=3"], ["toy.dropout"])
    argv = [str(changed), "--import", "toy_method", "--resume", "latest", "--allow-config-change", "toy.dropout", "train.learning_rate"]
    assert wf_train.main(argv) == 0
    records = {r["key"]: r for r in _records(run_dir)}
    assert records["toy.dropout"]["step"] == 4 and (records["toy.dropout"]["old"], records["toy.dropout"]["new"]) == (0.1, 0.3)
    assert (records["train.learning_rate"]["old"], records["train.learning_rate"]["new"]) == (0.01, 0.02)
    assert records["toy.dropout"]["checkpoint"] == "checkpoint-000004"
    assert records["train.max_steps"]["step"] == 4 and records["train.max_steps"]["new"] == 6  # free, recorded too
    assert (run_dir / "config.yaml").read_bytes() == original
    assert yaml.safe_load(original)["toy"]["dropout"] == 0.1
    assert json.loads((run_dir / "checkpoints" / "checkpoint-000006" / ckpt.STATE_FILE).read_text())["step"] == 6

    # the accepted values stay in force: the next resume with them needs no flag, and loading uses them
    longer = write_recipe(tmp_path / "c.yaml", run_dir, {"max_steps": 8, "checkpoint_every": 2, "learning_rate": 0.02}, {"dropout": 0.3})
    trainer = trun.prepare_run(longer, [], "latest")[0]
    trainer.train(resume="latest")
    assert trainer.optimizers["model"].param_groups[0]["lr"] == 0.02 and trainer.method.body[2].p == 0.3
    assert [r["key"] for r in _records(run_dir)].count("toy.dropout") == 1
    method, cfg = trun.load_method_from_run(run_dir)
    assert cfg.toy.dropout == 0.3 and cfg.train.learning_rate == 0.02 and cfg.train.max_steps == 8
    # going back to the original value is a change again
    with pytest.raises(ConfigError, match=r"toy.dropout: 0.3 -> 0.1"):
        trun.prepare_run(write_recipe(tmp_path / "d.yaml", run_dir, {"max_steps": 10, "learning_rate": 0.02}, {"dropout": 0.1}), [], "latest")


def test_resume_may_change_max_steps_logging_and_sampling_freely(tmp_path):
    run_dir = tmp_path / "run"
    first = write_recipe(tmp_path / "a.yaml", run_dir, {"max_steps": 4, "checkpoint_every": 2}, {"dropout": 0.1},
                         data={"num_samples": 7})
    trun.prepare_run(first)[0].train()
    # a run folder of the old layout (data.num_samples under the method's section) still compares correctly
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["toy"]["data_samples"] = saved["data"].pop("num_samples")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    original = (run_dir / "config.yaml").read_bytes()
    free = write_recipe(
        tmp_path / "b.yaml", run_dir,
        {"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5, "log_every": 2, "sample_every": 3, "eval_every": 3, "num_workers": 0},
        {"dropout": 0.1}, data={"num_samples": 7}, sample={"steps": 2, "seed": 5}, export={"weights": "online"},
    )
    trainer = trun.prepare_run(free, [], "latest", evaluator=toy_evaluator)[0]
    trainer.train(resume="latest")
    assert trainer.step == 6 and (run_dir / "samples" / "step-000006.png").is_file()
    assert (run_dir / "config.yaml").read_bytes() == original
    keys = {r["key"] for r in _records(run_dir)}
    assert {"train.max_steps", "train.checkpoint_every", "sample.steps"} <= keys and not any(k.startswith("toy.") for k in keys)


# --------------------------------------------------------------------------- resume: corrupt checkpoints


class RunsCode:
    """A pickle that calls os.mkdir when unpickled without restrictions."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.mkdir, (str(self.flag),))


CORRUPTIONS = {
    "optimizers-garbage": (ckpt.OPTIMIZER_FILE, lambda f, flag: f.write_bytes(b"\x00not a checkpoint\xff" * 50)),
    "optimizers-pickle-with-code": (ckpt.OPTIMIZER_FILE, lambda f, flag: f.write_bytes(pickle.dumps(RunsCode(flag), protocol=2))),
    "model-truncated": (ckpt.MODEL_FILE, lambda f, flag: f.write_bytes(f.read_bytes()[:40])),
    "rng-garbage": ("rng.pt", lambda f, flag: f.write_bytes(b"garbage")),
    "state-not-json": (ckpt.STATE_FILE, lambda f, flag: f.write_text("{not json")),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_named_and_previous_resumes(tmp_path, capsys, case):
    name, corrupt = CORRUPTIONS[case]
    train = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}
    run_dir = tmp_path / "run"
    trun.prepare_run(write_recipe(tmp_path / "a.yaml", run_dir, train))[0].train()
    bad = run_dir / "checkpoints" / "checkpoint-000006" / name
    flag = tmp_path / "code-ran"
    corrupt(bad, flag)
    recipe = write_recipe(tmp_path / "b.yaml", run_dir, {**train, "max_steps": 8})
    with pytest.raises(ckpt.CheckpointError) as info:
        trun.prepare_run(recipe, [], "latest", evaluator=toy_evaluator)[0].train(resume="latest")
    msg = str(info.value)
    assert str(bad) in msg and "--resume previous" in msg and "checkpoint-000004" in msg
    assert not flag.exists(), "nothing in a checkpoint may run code"
    if name == ckpt.MODEL_FILE:  # loading for an export names the way out too
        with pytest.raises(ckpt.CheckpointError, match="--checkpoint previous"):
            trun.load_method_from_run(run_dir)
        assert trun.load_method_from_run(run_dir, "previous")[1].train.max_steps == 6
    assert wf_train.main([str(recipe), "--import", "toy_method", "--resume", "latest"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and str(bad) in err[0]

    assert wf_train.main([str(recipe), "--import", "toy_method", "--resume", "previous"]) == 0
    cdir = run_dir / "checkpoints"
    assert ckpt.read_latest(cdir) == "checkpoint-000008"
    assert json.loads((cdir / "checkpoint-000008" / ckpt.STATE_FILE).read_text())["step"] == 8
    reference = run_inprocess(tmp_path, "reference", {**train, "max_steps": 8})
    assert max_diff(final_weights(run_dir), final_weights(reference.run_dir)) <= 1e-6
    assert not flag.exists()


def test_find_checkpoint_previous(tmp_path):
    cdir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt.save_checkpoint(cdir, step, {"w": torch.full((2,), float(step))}, {"step": step})
    assert ckpt.find_checkpoint(tmp_path, "previous").name == "checkpoint-000004"
    (cdir / "latest").unlink()  # lost pointer: `latest` is the newest finished folder, `previous` the one before
    assert ckpt.find_checkpoint(tmp_path, "previous").name == "checkpoint-000004"
    ckpt.write_latest(cdir, "checkpoint-000002")
    with pytest.raises(ckpt.CheckpointError, match="no finished checkpoint before 'checkpoint-000002'"):
        ckpt.find_checkpoint(tmp_path, "previous")
    with pytest.raises(ckpt.CheckpointError, match="no finished checkpoint"):
        ckpt.find_checkpoint(tmp_path / "nothing", "previous")
