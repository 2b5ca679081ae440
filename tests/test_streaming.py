"""Training straight from webdataset shards (``data.streaming``), without a latent cache.

* the stream itself: per-epoch deterministic shuffles, disjoint per-rank shares that cover every sample
  once per epoch, DataLoader workers that do not change the order, positions that resume exactly,
  unreadable samples skipped (and counted in the position) and the valid-fraction floor;
* LCD on the tiny SD teacher: a streamed run and a run from the latent cache of the same 64 samples take
  the same steps (loss sequence), and a streamed run stopped at a checkpoint and resumed equals the
  uninterrupted one (loss sequence and final weights), across an epoch boundary, with a shuffle buffer
  and an unreadable sample in the shards;
* (slow) two processes under ``accelerate launch``: disjoint shares, every rank's position in the
  checkpoint, and a two-process resume that repeats the uninterrupted run's batches and weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastgen.data.shards import ShardStream, write_shards
from fastgen.data.sources import DataConfig, build_dataset
from fastgen.data.streaming import StreamingDataset, StreamPosition, start_position
from fastgen.errors import ConfigError, DataError
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine import run as trun
from tiny_models import make_tiny_sd

WORDS = ["red", "green", "blue", "cat", "dog", "house", "tree", "car"]


def caption(i: int) -> str:
    return f"a {WORDS[i % 8]} {WORDS[(i // 8) % 8]} number {i}"


def sample_items(n: int, size: int = 16, bad: tuple[int, ...] = ()) -> list:
    rng = np.random.default_rng(7)
    items = []
    for i in range(n):
        if i in bad:
            items.append((b"not an image", caption(i)))
        else:
            items.append((Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), caption(i)))
    return items


def number(item_caption: str) -> int:
    return int(item_caption.rsplit(" ", 1)[1])


# --------------------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-shards")
    write_shards(sample_items(23, size=8), root, per_shard=5)
    return root


def test_epochs_are_deterministic_shuffles_and_ranks_split_them(small_shards):
    stream = ShardStream(small_shards, resolution=4, shuffle_buffer=4)
    assert isinstance(stream, StreamingDataset)
    orders = {}
    for seed, epoch in ((0, 0), (0, 1), (1, 0)):
        shares = [[number(x["caption"]) for x in stream.configured(rank=r, world_size=2, seed=seed).iter_epoch(epoch)]
                  for r in range(2)]
        assert sorted(shares[0] + shares[1]) == list(range(23)), "every sample once per epoch over the ranks"
        assert abs(len(shares[0]) - len(shares[1])) <= 1
        again = [number(x["caption"]) for x in stream.configured(rank=0, world_size=2, seed=seed).iter_epoch(epoch)]
        assert again == shares[0], "an epoch's order depends on (seed, epoch, rank) only"
        orders[(seed, epoch)] = shares[0]
    assert orders[(0, 0)] != orders[(0, 1)] and orders[(0, 0)] != orders[(1, 0)]
    plain = [number(x["caption"]) for x in stream.configured(shuffle=False).iter_epoch(3)]
    assert plain == list(range(23)), "shuffle=false reads the shards in order, every epoch"


def test_batches_resume_exactly_with_and_without_workers(small_shards):
    stream = ShardStream(small_shards, resolution=4, shuffle_buffer=6)

    def take(batches, n):
        return [[number(c) for c in next(batches)["caption"]] for _ in range(n)]

    full = stream.batches(4, seed=5)
    reference = take(full, 14)  # 56 samples: into the third epoch
    assert full.position.epoch == 2 and full.position.samples == 56
    with_workers = stream.batches(4, seed=5, num_workers=2)
    assert take(with_workers, 14) == reference, "DataLoader workers must not change the order"
    with_workers.close()
    for cut in (3, 6):  # mid-epoch and right after an epoch boundary
        head = stream.batches(4, seed=5)
        first = take(head, cut)
        saved = json.loads(json.dumps(head.state_dict()))
        tail = stream.batches(4, seed=5, start=StreamPosition.from_dict(saved), num_workers=1 + cut % 2)
        assert first + take(tail, 14 - cut) == reference
        assert tail.position == full.position
        tail.close()


def test_unreadable_samples_are_skipped_counted_and_floored(tmp_path):
    write_shards(sample_items(12, size=8, bad=(3,)), tmp_path / "one", per_shard=4)
    batches = ShardStream(tmp_path / "one", resolution=4, shuffle_buffer=0).batches(5, shuffle=False)
    first, second = next(batches), next(batches)
    got = [number(c) for c in list(first["caption"]) + list(second["caption"])]
    assert got == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert batches.num_bad == 1 and batches.bad_files[0].endswith(":000000003")
    assert batches.position == StreamPosition(0, 11, 10), "the skipped sample counts in the raw offset"

    write_shards(sample_items(30, size=8, bad=tuple(range(1, 30, 2))), tmp_path / "many", per_shard=30)
    batches = ShardStream(tmp_path / "many", resolution=4, min_valid_fraction=0.9).batches(4, shuffle=False)
    with pytest.raises(DataError, match="min_valid_fraction"):
        for _ in range(10):
            next(batches)
    assert batches.num_seen <= 21, "stopped once 20 samples were seen"


def test_compressed_and_truncated_shards(tmp_path):
    import gzip

    (plain,) = write_shards(sample_items(9, size=8), tmp_path / "plain", per_shard=9)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "data.tar.gz").write_bytes(gzip.compress(Path(plain).read_bytes()))
    packed = ShardStream(tmp_path / "gz", resolution=4, shuffle_buffer=3)  # read front to back, bytes kept
    shares = [[number(x["caption"]) for x in packed.configured(rank=r, world_size=2, seed=1).iter_epoch(0)] for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(9))
    full = packed.batches(2, seed=1)
    reference = [list(next(full)["caption"]) for _ in range(7)]  # 14 samples: into epoch 1
    head = packed.batches(2, seed=1)
    first = [list(next(head)["caption"]) for _ in range(3)]
    tail = packed.batches(2, seed=1, start=head.position)
    assert first + [list(next(tail)["caption"]) for _ in range(4)] == reference

    data = Path(plain).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "data.tar").write_bytes(data[: len(data) * 2 // 3])  # killed while writing
    got = [number(x["caption"]) for x in ShardStream(tmp_path / "cut", resolution=4).configured(shuffle=False).iter_epoch(0)]
    assert 0 < len(got) < 9 and got == list(range(len(got))), got


def test_start_position_and_config_errors(small_shards, tmp_path):
    saved = {"world_size": 2, "ranks": [{"epoch": 1, "offset": 4, "samples": 20}, {"epoch": 1, "offset": 3, "samples": 19}]}
    assert start_position(saved, 1, 2) == (StreamPosition(1, 3, 19), None)
    pos, note = start_position(saved, 0, 1)
    assert pos == StreamPosition(1, 6, 39) and "2 process(es)" in note
    with pytest.raises(ValueError):
        start_position({"world_size": 3, "ranks": [{"epoch": 0}]}, 0, 3)
    with pytest.raises(ConfigError, match="exclude each other"):
        DataConfig(source=str(small_shards), streaming=True, latent_cache=True)
    with pytest.raises(ConfigError, match="streaming=false"):
        build_dataset(DataConfig(source="digits", streaming=True), resolution=8)
    assert isinstance(build_dataset(DataConfig(source=str(small_shards), streaming=True), resolution=4), ShardStream)
    with pytest.raises(DataError, match="streaming=true"):
        build_dataset(DataConfig(source=str(small_shards)), resolution=4)
    with pytest.raises(DataError, match="fewer than the 30 training processes"):
        next(ShardStream(small_shards, resolution=4).batches(1, rank=29, world_size=30))


# --------------------------------------------------------------------------- LCD from shards


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards64")
    write_shards(sample_items(64), root, per_shard=16)
    return root


def lcd_run(tmp: Path, name: str, teacher: Path, data: dict, train: dict, resume: str | None = None) -> tuple[list[float], object]:
    """Train LCD on the tiny SD teacher; returns the loss of every step and the trainer."""
    recipe = {
        "method": "lcd",
        "output_dir": str(tmp / name),
        "train": {"batch_size": 8, "learning_rate": 1e-3, "log_with": "none", "progress": False, "checkpoint_every": 0,
                  "sample_every": 0, "eval_every": 0, "log_every": 1, "seed": 3, **train},
        "teacher": {"path": str(teacher)},
        # the cache encodes in micro-batches too: CPU convolutions round differently per batch size (~1e-7)
        "data": {"cache_batch_size": 8, **data},
        "sample": {"eval_samples": 4},
        "lcd": {"num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 3.0, "w_embedding_dim": 16, "ema_decay": 0.5},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    trainer, _ = trun.prepare_run(path, [], resume)
    losses: list[float] = []
    step = trainer.method.train_step

    def recording(batch, it):
        out = step(batch, it)
        losses.append(float(out.losses["student"].detach()))
        return out

    trainer.method.train_step = recording
    trainer.train(resume=resume)
    return losses, trainer


def test_streamed_run_equals_cached_run_on_the_same_samples(tmp_path, teacher, shards64):
    # train.shuffle=false: both read the 64 samples in shard order, 8 steps = one epoch
    train = {"max_steps": 8, "shuffle": False}
    streamed, st = lcd_run(tmp_path, "streamed", teacher, {"source": str(shards64), "streaming": True}, train)
    cached, ct = lcd_run(tmp_path, "cached", teacher,
                         {"source": str(shards64), "latent_cache": True, "cache_dir": str(tmp_path / "cache")}, train)
    assert st.stream is not None and ct.stream is None and len(ct.method.train_dataset()) == 64
    assert len(streamed) == len(cached) == 8
    assert max(abs(a - b) for a, b in zip(streamed, cached)) <= 1e-5, (streamed, cached)
    state = json.loads((st.last_checkpoint / ckpt.STATE_FILE).read_text())
    # every raw sample of epoch 0 consumed (the next batch starts epoch 1)
    assert state["stream"] == {"world_size": 1, "ranks": [{"epoch": 0, "offset": 64, "samples": 64}]}
    assert state["samples_seen"] == 64


def test_streamed_run_stopped_and_resumed_equals_uninterrupted(tmp_path, teacher):
    shards = tmp_path / "shards"
    write_shards(sample_items(40, bad=(6,)), shards, per_shard=10)  # 39 readable samples
    data = {"source": str(shards), "streaming": True, "shuffle_buffer": 7}
    train = {"max_steps": 9}  # 72 samples: across the first epoch boundary (39 per epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, ft = lcd_run(tmp_path, "full", teacher, data, train)
        head, _ = lcd_run(tmp_path, "stopped", teacher, data, {"max_steps": 4})
        # the stopped run's checkpoint: mid-epoch 0 (32 samples trained on, maybe the unreadable one skipped)
        state = json.loads((tmp_path / "stopped" / "checkpoints" / "checkpoint-000004" / ckpt.STATE_FILE).read_text())
        (pos,) = state["stream"]["ranks"]
        assert pos["epoch"] == 0 and pos["samples"] == 32 and pos["offset"] in (32, 33)
        # DataLoader workers (train.num_workers may change at a resume) decode in parallel, in the same order
        tail, rt = lcd_run(tmp_path, "stopped", teacher, data, {**train, "num_workers": 2}, resume="latest")
    assert len(full) == 9 and len(head) == 4 and len(tail) == 5
    assert head + tail == full, (head + tail, full)
    a = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "full", "latest"))
    b = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "stopped", "latest"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rt.stream.position == ft.stream.position and ft.stream.position.epoch == 1
    assert ft.stream.num_bad >= 1  # the unreadable sample was met (and skipped) on the way


# --------------------------------------------------------------------------- two processes

DDP_SCRIPT = r"""
import json, sys
from safetensors.torch import save_file
from fastgen.trainers.engine.run import prepare_run
recipe, out, resume = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
trainer, _ = prepare_run(recipe, [], resume)
seen = []
step = trainer.method.train_step
def recording(batch, it):
    seen.append(list(batch["caption"]))
    return step(batch, it)
trainer.method.train_step = recording
trainer.train(resume=resume)
r = trainer.rank
save_file({k: v.detach().cpu().contiguous() for k, v in trainer.method.checkpoint_state_dict().items()}, f"{out}/weights-rank{r}.safetensors")
json.dump({"seen": seen, "position": trainer.stream.position.to_dict()}, open(f"{out}/seen-rank{r}.json", "w"))
"""


def launch_two(script: Path, recipe: Path, out: Path, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script), str(recipe),
           str(out), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    from safetensors.torch import load_file

    return [{"weights": load_file(str(out / f"weights-rank{i}.safetensors")),
             **json.loads((out / f"seen-rank{i}.json").read_text())} for i in (0, 1)]


# 30-70 s on two busy cores (four process start-ups loading the teacher): `make test-slow` runs it
@pytest.mark.slow
def test_two_processes_stream_disjoint_shares_and_resume_exactly(tmp_path, teacher):
    shards = tmp_path / "shards"
    write_shards(sample_items(30, bad=(4,)), shards, per_shard=8)
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_SCRIPT)
    recipe = {
        "method": "lcd", "output_dir": str(tmp_path / "run"),
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-3, "log_with": "none", "progress": False,
                  "checkpoint_every": 3, "sample_every": 0, "eval_every": 0, "seed": 1},
        "teacher": {"path": str(teacher)},
        "data": {"source": str(shards), "streaming": True, "shuffle_buffer": 5},
        "sample": {"eval_samples": 4},
        "lcd": {"num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 3.0, "w_embedding_dim": 16},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    full = launch_two(script, path, tmp_path / "full")
    assert all(torch.equal(full[0]["weights"][k], full[1]["weights"][k]) for k in full[0]["weights"])
    first_epoch = [set(sum(r["seen"], [])[:12]) for r in full]  # 12 of each rank's ~15 epoch-0 samples
    assert not first_epoch[0] & first_epoch[1], "the ranks read disjoint shares"
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-000003" / ckpt.STATE_FILE).read_text())
    assert state["stream"]["world_size"] == 2 and [p["samples"] for p in state["stream"]["ranks"]] == [12, 12]

    # resume the run at its step-3 checkpoint (two processes again): the same steps, the same final weights
    resumed = launch_two(script, path, tmp_path / "resumed", "checkpoint-000003")
    for rank in (0, 1):
        assert resumed[rank]["seen"] == full[rank]["seen"][3:]
        assert resumed[rank]["position"] == full[rank]["position"]
        assert all(torch.equal(resumed[rank]["weights"][k], full[rank]["weights"][k]) for k in full[rank]["weights"])
