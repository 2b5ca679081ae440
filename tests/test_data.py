"""Tests of fastgen.data: folders, webdataset shards, prompt files and the embedding cache."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.data.cache import CachedDataset, EmbeddingCache, cache_key
from fastgen.data.folders import ImageCaptionFolder
from fastgen.data.prompts import PromptDataset, ensure_batch, load_prompts
from fastgen.data.shards import ImageCaptionShards, expand_shards, write_shards
from fastgen.data.sources import DataConfig, build_dataset, source_kind
from fastgen.errors import DataError

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 64, 32)]


def solid(color, size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def make_pairs(root: Path, n: int = 4, ext: str = "png") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        solid(COLORS[i % len(COLORS)]).save(root / f"img{i}.{ext}")
        caption = f"caption {i}"
        (root / f"img{i}.txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def expected_pixels(color) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1


# --------------------------------------------------------------------------- folders


def test_folder_pairs_layout_values(tmp_path):
    make_pairs(tmp_path, 3)
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(ds) == 3 and ds.layout == "pairs"
    for i in range(3):
        item = ds[i]
        assert item["caption"] == f"caption {i}"
        assert item["index"] == i
        px = item["pixels"]
        assert px.shape == (3, 8, 8) and px.dtype == torch.float32
        assert torch.allclose(px, expected_pixels(COLORS[i]).expand(3, 8, 8), atol=1e-6)
    # Red: exactly +1 in R and -1 in G/B, so the range is [-1, 1] inclusive.
    assert ds[0]["pixels"].max() == 1.0 and ds[0]["pixels"].min() == -1.0


def test_folder_metadata_layout_resize_and_center_crop(tmp_path):
    # 32x16 image: left half black, right half white. Shorter side -> 8, width -> 16,
    # then a centre crop of 8 keeps columns 4..11 of the resized image.
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, 16:] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    solid((0, 0, 255)).save(tmp_path / "blue.jpg", quality=100)
    lines = [
        {"file_name": "wide.png", "text": "a wide image"},
        {"file_name": "blue.jpg", "caption": "blue"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = ImageCaptionFolder(tmp_path, resolution=(8, 8))
    assert ds.layout == "metadata" and len(ds) == 2
    wide = ds[0]
    assert wide["caption"] == "a wide image"
    assert wide["pixels"].shape == (3, 8, 8)
    assert torch.all(wide["pixels"][:, :, :2] == -1.0)  # left columns still black
    assert torch.all(wide["pixels"][:, :, -2:] == 1.0)  # right columns still white
    blue = ds[1]
    assert blue["caption"] == "blue"
    assert blue["pixels"][2].mean() > 0.9 and blue["pixels"][0].mean() < -0.9

    # Non-square resolution (height, width).
    rect = ImageCaptionFolder(tmp_path, resolution=(4, 12))[0]["pixels"]
    assert rect.shape == (3, 4, 12)


def test_folder_flip_and_caption_dropout(tmp_path):
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, 8:] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("half")
    ds = ImageCaptionFolder(tmp_path, resolution=16, random_flip=True, caption_dropout=1.0)
    lefts = {float(ds[0]["pixels"][0, 0, 0]) for _ in range(24)}
    assert lefts == {-1.0, 1.0}  # both orientations occur
    assert ds[0]["caption"] == ""


def test_corrupt_png_is_counted_and_replaced(tmp_path, caplog):
    make_pairs(tmp_path, 4)
    bad = tmp_path / "img1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ImageCaptionFolder(tmp_path, resolution=8, min_valid_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]  # a full epoch, no crash
        again = ds[1]
    assert ds.num_bad == 1 and ds.bad_files == [str(bad)]
    assert items[1]["index"] == 2 and items[1]["caption"] == "caption 2"  # next valid item
    assert again["index"] == 2
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1  # logged once


def test_truncated_image_counts_as_bad(tmp_path):
    make_pairs(tmp_path, 3)
    arr = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    Image.fromarray(arr).save(tmp_path / "img2.png")
    whole = (tmp_path / "img2.png").read_bytes()
    (tmp_path / "img2.png").write_bytes(whole[: len(whole) // 2])
    ds = ImageCaptionFolder(tmp_path, resolution=8, min_valid_fraction=0.5)
    assert ds[2]["index"] == 0  # wraps around to the first valid item
    assert ds.num_bad == 1


def test_too_many_corrupt_files_raise(tmp_path):
    make_pairs(tmp_path, 4)
    for i in (0, 1):
        (tmp_path / f"img{i}.png").write_bytes(b"not an image")
    ds = ImageCaptionFolder(tmp_path, resolution=8, min_valid_fraction=0.9)
    with pytest.raises(DataError) as err:
        for i in range(len(ds)):
            ds[i]
    msg = str(err.value)
    assert "1 of 4" in msg and "img0.png" in msg and "min_valid_fraction" in msg


def test_verify_reports_bad_files(tmp_path):
    make_pairs(tmp_path, 3)
    (tmp_path / "img0.png").write_bytes(b"junk")
    ds = ImageCaptionFolder(tmp_path, resolution=8, min_valid_fraction=0.0)
    report = ds.verify()
    assert (report.total, report.ok, report.bad) == (3, 2, 1)
    assert report.bad_files == [str(tmp_path / "img0.png")]
    assert ds[0]["index"] == 1  # known-bad item skipped without re-reading


def test_folder_errors_name_folder_and_layouts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        ImageCaptionFolder(empty)
    msg = str(err.value)
    assert str(empty) in msg and ".txt" in msg and "metadata.jsonl" in msg

    with pytest.raises(DataError, match="does not exist.*metadata.jsonl"):
        ImageCaptionFolder(tmp_path / "nope")

    nocap = tmp_path / "nocap"
    nocap.mkdir()
    solid((1, 2, 3)).save(nocap / "x.png")
    with pytest.raises(DataError, match=r"1 images but no captions.*x\.txt"):
        ImageCaptionFolder(nocap)


# --------------------------------------------------------------------------- captions


def test_captions_are_read_as_utf8(tmp_path):
    solid((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("un café, 猫\n", encoding="utf-8")
    solid((1, 2, 3)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("\ufeffnaïve bom".encode("utf-8"))  # a UTF-8 byte-order mark is dropped
    ds = ImageCaptionFolder(tmp_path, resolution=4)
    assert ds.captions == ["un café, 猫", "naïve bom"]


def test_caption_file_not_utf8_is_a_clear_error(tmp_path):
    make_pairs(tmp_path, 2)
    (tmp_path / "img1.txt").write_bytes("un café".encode("latin-1"))
    with pytest.raises(DataError) as err:
        ImageCaptionFolder(tmp_path, resolution=4)
    msg = str(err.value)
    assert str(tmp_path / "img1.txt") in msg and "not valid UTF-8" in msg and "save it as UTF-8" in msg

    meta = tmp_path / "meta"
    meta.mkdir()
    solid((1, 2, 3)).save(meta / "x.png")
    (meta / "metadata.jsonl").write_bytes('{"file_name": "x.png", "text": "café"}\n'.encode("cp1252"))
    with pytest.raises(DataError) as err:
        ImageCaptionFolder(meta, resolution=4)
    msg = str(err.value)
    assert str(meta / "metadata.jsonl") in msg and "save it as UTF-8" in msg

    (tmp_path / "prompts.txt").write_bytes("un café\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_prompts(tmp_path / "prompts.txt")
    assert str(tmp_path / "prompts.txt") in str(err.value) and "save it as UTF-8" in str(err.value)


def test_shard_caption_not_utf8_skips_the_sample_with_a_clear_reason(tmp_path, caplog):
    items = [{"image": solid((1, 2, 3)), "caption": f"ok {i}", "key": f"k{i}"} for i in range(3)]
    write_shards(items, tmp_path, per_shard=3)
    # Rewrite the middle caption member with latin-1 bytes.
    shard = tmp_path / "data-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "k1.txt":
                data = "café".encode("latin-1")
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    ds = ImageCaptionShards(shard, resolution=4, rank=0, world_size=1, min_valid_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        got = [x["caption"] for x in ds]
    assert got == ["ok 0", "ok 2"] and ds.num_bad == 1
    assert any("k1" in r.getMessage() and "not valid UTF-8" in r.getMessage() for r in caplog.records)


def _long_caption_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]


def test_long_captions_counted_and_warned_once_per_dataset(tmp_path, caplog):
    captions = ["a cat", "a very long caption about a dog", "one two three four", "short"]
    for i, caption in enumerate(captions):
        solid(COLORS[i]).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(caption)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, resolution=4, max_caption_tokens=3)
        for _ in range(2):
            [ds[i] for i in range(len(ds))]
    assert ds.num_long_captions == 2  # 7 and 4 whitespace tokens > 3
    (msg,) = _long_caption_warnings(caplog)
    assert "2 of 4 captions" in msg and "longer than 3 tokens" in msg

    # A caller's tokenizer count replaces the whitespace count (here: characters).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        by_chars = ImageCaptionFolder(tmp_path, resolution=4, max_caption_tokens=5, count_tokens=len)
    assert by_chars.num_long_captions == 2  # 31 and 18 characters > 5; "a cat" and "short" fit
    assert len(_long_caption_warnings(caplog)) == 1

    # No limit, no counting, no warning; a limit no caption exceeds, no warning either.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ImageCaptionFolder(tmp_path, resolution=4).num_long_captions == 0
        assert ImageCaptionFolder(tmp_path, resolution=4, max_caption_tokens=77).num_long_captions == 0
    assert _long_caption_warnings(caplog) == []
    with pytest.raises(DataError, match="max_caption_tokens"):
        ImageCaptionFolder(tmp_path, resolution=4, max_caption_tokens=0)


def test_long_shard_captions_counted_and_warned_once(tmp_path, caplog):
    items = [(solid((5, 5, 5)), "x " * n) for n in (1, 10, 2, 12, 3)]
    write_shards(items, tmp_path, per_shard=2)
    ds = ImageCaptionShards(tmp_path, resolution=4, rank=0, world_size=1, max_caption_tokens=5)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three epochs, one warning
            assert len(list(ds)) == 5
    assert ds.num_long_captions == 2
    (msg,) = _long_caption_warnings(caplog)
    assert "2 of 5 captions" in msg and "longer than 5 tokens" in msg


# --------------------------------------------------------------------------- shards


def _items(n: int):
    return [(solid(COLORS[i % len(COLORS)]), f"sample {i}") for i in range(n)]


def test_shards_round_trip_txt_and_json(tmp_path):
    txt = write_shards(_items(5), tmp_path / "txt", per_shard=2)
    assert [Path(p).name for p in txt] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    js = write_shards(_items(3), tmp_path / "js", per_shard=10, caption_format="json", image_format="jpg")

    for source, n in ((tmp_path / "txt", 5), (str(tmp_path / "js" / "data-{000000..000000}.tar"), 3)):
        ds = ImageCaptionShards(source, resolution=8, rank=0, world_size=1)
        got = list(ds)
        assert sorted(x["caption"] for x in got) == [f"sample {i}" for i in range(n)]
        assert len({x["key"] for x in got}) == n  # each sample exactly once
        for x in got:
            assert x["pixels"].shape == (3, 8, 8)
            assert x["pixels"].min() >= -1.0 and x["pixels"].max() <= 1.0
        assert ds.num_bad == 0

    png = {x["caption"]: x["pixels"] for x in ImageCaptionShards(txt, resolution=8, rank=0, world_size=1)}
    assert torch.equal(png["sample 2"], expected_pixels(COLORS[2]).expand(3, 8, 8))


def test_expand_shards_pattern_and_errors(tmp_path):
    paths = write_shards(_items(4), tmp_path, per_shard=1)
    assert expand_shards(str(tmp_path / "data-{000000..000003}.tar")) == paths
    with pytest.raises(DataError, match="do not exist.*pattern"):
        expand_shards(str(tmp_path / "data-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        ImageCaptionShards(tmp_path / "empty")


@pytest.mark.parametrize("split,n_shards", [("shard", 4), ("sample", 1), ("auto", 3)])
def test_two_ranks_cover_every_sample_once(tmp_path, split, n_shards):
    n = 7
    write_shards(_items(n), tmp_path, per_shard=-(-n // n_shards))
    seen = []
    for rank in range(2):
        ds = ImageCaptionShards(tmp_path, resolution=4, rank=rank, world_size=2, split=split)
        part = [x["caption"] for x in ds]
        assert part  # both ranks get work
        seen += part
    assert sorted(seen) == sorted(f"sample {i}" for i in range(n))


def test_shards_with_dataloader_workers_each_sample_once(tmp_path):
    write_shards(_items(6), tmp_path, per_shard=2)
    ds = ImageCaptionShards(tmp_path, resolution=4, rank=0, world_size=1, shuffle_buffer=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(x["caption"] for x in loader) == sorted(f"sample {i}" for i in range(6))


def test_corrupt_shard_samples_skipped_then_floor(tmp_path):
    items = _items(6)
    items[2] = (b"garbage bytes", "broken")
    write_shards(items, tmp_path / "few", per_shard=3)
    ds = ImageCaptionShards(tmp_path / "few", resolution=4, rank=0, world_size=1, min_valid_fraction=0.5)
    got = [x["caption"] for x in ds]
    assert "broken" not in got and len(got) == 5
    assert ds.num_bad == 1 and ds.bad_files[0].endswith(":000000002")

    many = [(b"bad", f"b{i}") if i % 2 else (solid((9, 9, 9)), f"ok{i}") for i in range(30)]
    write_shards(many, tmp_path / "many", per_shard=30)
    ds = ImageCaptionShards(tmp_path / "many", resolution=4, rank=0, world_size=1, min_valid_fraction=0.9)
    got = []
    with pytest.raises(DataError, match="min_valid_fraction"):
        for x in ds:
            got.append(x)
    assert len(got) == 10  # stopped once 20 samples were seen, not at the end


def test_zero_byte_or_corrupt_tar_is_named_not_sent_to_the_cache(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive\n" * 40)
    captions_only = tmp_path / "captions.tar"
    with tarfile.open(captions_only, "w") as tar:
        info = tarfile.TarInfo("000.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"a cat"))
    cases = ((empty, "is empty"), (junk, "is not a tar archive"), (captions_only, "no image\\+caption pair"))
    for path, problem in cases:
        for latent_cache in (False, True):  # diagnosed before the cache (or its teacher) is asked for
            with pytest.raises(DataError, match=problem) as err:
                build_dataset(DataConfig(source=str(path), latent_cache=latent_cache), resolution=8)
            msg = str(err.value)
            assert str(path) in msg and "latent_cache" not in msg, msg

    # One bad shard among good ones in a shard folder is named.
    good = write_shards(_items(2), tmp_path / "mixed", per_shard=1)
    bad = tmp_path / "mixed" / "data-000009.tar"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="is empty") as err:
        build_dataset(DataConfig(source=str(tmp_path / "mixed")), resolution=8)
    assert str(bad) in str(err.value) and good[0] not in str(err.value)

    # Readable shards still get the advice that fits them: a stream needs the latent cache.
    bad.unlink()
    with pytest.raises(DataError, match="latent_cache=true"):
        build_dataset(DataConfig(source=str(tmp_path / "mixed")), resolution=8)


def test_gzipped_shards_are_shards_and_checked(tmp_path):
    (plain,) = write_shards(_items(2), tmp_path / "plain", per_shard=2)
    packed = tmp_path / "data.tar.gz"
    packed.write_bytes(gzip.compress(Path(plain).read_bytes()))
    assert source_kind(DataConfig(source=str(packed))) == "shards"
    assert sorted(x["caption"] for x in ImageCaptionShards(packed, resolution=4, rank=0, world_size=1)) == [
        "sample 0", "sample 1"]
    with pytest.raises(DataError, match="latent_cache=true"):  # readable: only the stream advice is left
        build_dataset(DataConfig(source=str(packed)), resolution=4)

    junk = tmp_path / "junk.tgz"
    junk.write_bytes(gzip.compress(b"not a tar archive at all" * 30))
    assert source_kind(DataConfig(source=str(junk))) == "shards"
    with pytest.raises(DataError, match="is not a tar archive") as err:
        build_dataset(DataConfig(source=str(junk)), resolution=4)
    assert str(junk) in str(err.value)


def test_shard_cache_holds_the_samples_in_stream_order(tmp_path):
    """A latent cache of shards lists the samples as an unshuffled stream reads them (whatever data.seed says),
    so a cached and a streamed run with train.shuffle=false see the same batches."""
    from types import SimpleNamespace

    from fastgen.data.shards import ShardStream

    write_shards([(solid(COLORS[i % 6]), f"sample {i}") for i in range(7)], tmp_path / "s", per_shard=3)

    class Encoder:
        def encode(self, pixels):
            return pixels[:, :1, ::2, ::2]

        def encode_prompt(self, captions):
            return SimpleNamespace(hidden=torch.tensor([[float(c.split()[1])] for c in captions]), pooled=None)

    spec = DataConfig(source=str(tmp_path / "s"), latent_cache=True, cache_dir=str(tmp_path / "cache"), seed=5)
    cache = build_dataset(spec, resolution=4, teacher=Encoder(), teacher_id="fake")
    streamed = list(ShardStream(tmp_path / "s", resolution=4).configured(shuffle=False).iter_epoch(0))
    assert [cache[i]["caption"] for i in range(len(cache))] == [x["caption"] for x in streamed] == [f"sample {i}" for i in range(7)]
    assert [cache[i]["index"] for i in range(len(cache))] == [x["index"] for x in streamed]


# --------------------------------------------------------------------------- prompts


def test_load_prompts_all_formats(tmp_path):
    expected = ["a cat", "a dog, sitting", "a bird"]
    (tmp_path / "p.txt").write_text("# header\na cat\n\n  a dog, sitting  \n# note\na bird\n")
    (tmp_path / "p.json").write_text(json.dumps(expected))
    (tmp_path / "o.json").write_text(json.dumps([{"prompt": "a cat"}, {"caption": "a dog, sitting"},
                                                 {"text": "a bird"}]))
    (tmp_path / "p.jsonl").write_text('"a cat"\n{"prompt": "a dog, sitting"}\n\n{"text": "a bird"}\n')
    (tmp_path / "p.csv").write_text('id,Caption\n1,a cat\n2,"a dog, sitting"\n3,a bird\n')
    for name in ("p.txt", "p.json", "o.json", "p.jsonl", "p.csv"):
        assert load_prompts(tmp_path / name) == expected, name


def test_load_prompts_errors(tmp_path):
    (tmp_path / "e.txt").write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(tmp_path / "e.txt")
    (tmp_path / "c.csv").write_text("id,label\n1,x\n")
    with pytest.raises(DataError, match="no prompt column.*'prompt'"):
        load_prompts(tmp_path / "c.csv")
    (tmp_path / "x.yaml").write_text("- a\n")
    with pytest.raises(DataError, match="unsupported extension"):
        load_prompts(tmp_path / "x.yaml")
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_ensure_batch_and_prompt_dataset():
    with pytest.raises(DataError) as err:
        ensure_batch(["a", "b", "c"], 8)
    assert str(err.value) == "prompt list has 3 prompts but the batch size is 8; add prompts or lower batch_size"
    assert ensure_batch(["a", "b"], 2) == ["a", "b"]

    once = PromptDataset(["a", "b", "c"], repeat=False)
    assert list(once) == ["a", "b", "c"] and len(once) == 3 and once[1] == "b"
    it = iter(PromptDataset(["a", "b"], repeat=True))
    assert [next(it) for _ in range(5)] == ["a", "b", "a", "b", "a"]
    shuffled = list(PromptDataset([str(i) for i in range(10)], repeat=False, shuffle=True, seed=1))
    assert sorted(shuffled) == [str(i) for i in range(10)]


# --------------------------------------------------------------------------- cache


def _encoders():
    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(pixels, 4)  # [B, 3, 2, 2] for 8x8 inputs

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        codes = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {"prompt_embeds": codes.unsqueeze(1).repeat(1, 3, 1), "pooled": codes.sum(1)}

    return encode_images, encode_text


def test_cache_build_matches_direct_encoding(tmp_path):
    make_pairs(tmp_path / "imgs", 5)
    ds = ImageCaptionFolder(tmp_path / "imgs", resolution=8)
    enc_img, enc_txt = _encoders()
    key = cache_key("model-dir", 8)
    cached = EmbeddingCache(tmp_path / "cache").build(ds, enc_img, enc_txt, batch_size=2, key=key,
                                                      items_per_shard=3)
    assert EmbeddingCache(tmp_path / "cache").is_complete()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    reread = CachedDataset(tmp_path / "cache", key=key)
    assert len(cached) == len(reread) == 5
    for i in range(5):
        item, ref = reread[i], ds[i]
        direct_text = enc_txt([ref["caption"]])
        assert item["caption"] == ref["caption"] and item["index"] == i
        assert torch.equal(item["latents"], enc_img(ref["pixels"][None])[0])
        assert torch.equal(item["prompt_embeds"], direct_text["prompt_embeds"][0])
        assert torch.equal(item["pooled"], direct_text["pooled"][0])

    # A second build with the same key reuses the cache without encoding.
    def boom(_):
        raise AssertionError("encoder should not run")

    again = EmbeddingCache(tmp_path / "cache").build(ds, boom, boom, batch_size=2, key=key)
    assert len(again) == 5


def test_cache_key_mismatch(tmp_path):
    make_pairs(tmp_path / "imgs", 2)
    ds = ImageCaptionFolder(tmp_path / "imgs", resolution=8)
    enc_img, enc_txt = _encoders()
    cache = EmbeddingCache(tmp_path / "cache")
    cache.build(ds, enc_img, enc_txt, batch_size=2, key=cache_key("model-a", 8))
    other = cache_key("model-b", 8)
    assert other != cache_key("model-a", 8) and cache_key("ab", "c") != cache_key("a", "bc")
    with pytest.raises(DataError, match="rebuild.*new cache dir"):
        CachedDataset(tmp_path / "cache", key=other)
    with pytest.raises(DataError, match="rebuild.*new cache dir"):
        cache.build(ds, enc_img, enc_txt, batch_size=2, key=other)
    rebuilt = cache.build(ds, enc_img, enc_txt, batch_size=2, key=other, overwrite=True)
    assert rebuilt.key == other and len(rebuilt) == 2


def test_interrupted_cache_build_is_not_complete(tmp_path):
    make_pairs(tmp_path / "imgs", 4)
    ds = ImageCaptionFolder(tmp_path / "imgs", resolution=8)
    enc_img, enc_txt = _encoders()
    key = cache_key("m", 8)
    root = tmp_path / "cache"

    calls = {"n": 0}

    def dies(pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # simulated Ctrl-C mid-build
        return enc_img(pixels)

    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache(root).build(ds, dies, enc_txt, batch_size=1, key=key, items_per_shard=1)
    assert not root.exists() and not EmbeddingCache(root).is_complete()

    # A hard kill leaves the temp dir behind, even with shards and an index inside it.
    leftover = tmp_path / ".cache.building-999999999-deadbeef"
    leftover.mkdir()
    (leftover / "index.json").write_text(json.dumps({"format": "fastgen-embedding-cache", "complete": True,
                                                     "key": key, "shards": []}))
    assert not EmbeddingCache(root).is_complete()
    with pytest.raises(DataError, match="no complete embedding cache.*unfinished build"):
        CachedDataset(root, key=key)

    # A cache folder whose index is missing (killed before the index was written).
    root.mkdir()
    save = tmp_path / "cache" / "shard-000000.safetensors"
    save.write_bytes(b"partial")
    assert not EmbeddingCache(root).is_complete()
    with pytest.raises(DataError, match="not empty but holds no complete cache"):
        EmbeddingCache(root).build(ds, enc_img, enc_txt, batch_size=2, key=key)

    built = EmbeddingCache(root).build(ds, enc_img, enc_txt, batch_size=2, key=key, overwrite=True)
    assert len(built) == 4 and not leftover.exists()  # stale temp dir cleaned up
