"""Data: bad records skipped and counted, ranks x workers partition, resume, webdataset shards."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataOptions, EveDataset
from train.loader import EveDataLoader, build_dataloader
from train.packing import Collator
from train.records import Record


class FakeEncoder:
    """Sample i -> input_ids [1000 + i, ...] of length 2 + i % 7 (no images: fast partition tests)."""

    def __call__(self, rec: Record, with_pixels: bool = True) -> dict:
        i = int(rec.source.split("#")[1].split()[0])
        n = 2 + i % 7
        return {"input_ids": [1000 + i] + [5] * (n - 1), "labels": [-100] + [5] * (n - 1), "length": n}


def _json(tmp_path, n):
    path = tmp_path / "data.json"
    path.write_text(
        json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": "hi"}]} for i in range(n)])
    )
    return str(path)


def _ids(batch):
    # first token of every sample: packed rows restart positions at 0 (the pad tail has input id 0)
    ids = batch["input_ids"]
    starts = (
        batch["position_ids"] == 0 if "position_ids" in batch else torch.zeros_like(ids, dtype=torch.bool)
    )
    if "position_ids" not in batch:
        starts[:, 0] = True
    return [int(x) - 1000 for x in ids[starts] if x >= 1000]


def _loader(path, rank=0, world=1, workers=0, packing=False, window=8, batch_size=3):
    opts = DataOptions(
        json=path, packing=packing, batch_size=batch_size, window=window, seed=3, max_length=64
    )
    ds = EveDataset(
        opts, FakeEncoder(), Collator(packing=packing, pad_to_multiple_of=1), rank, world, workers
    )
    return EveDataLoader(ds)


def test_ranks_times_workers_partition(tmp_path):
    path = _json(tmp_path, 53)
    seen = []
    for rank in range(2):
        for batch in _loader(path, rank=rank, world=2, workers=2):
            seen += _ids(batch)
    assert sorted(seen) == list(range(53))  # every sample exactly once per epoch


def test_epochs_reshuffle(tmp_path):
    loader = _loader(_json(tmp_path, 30))
    first = [i for b in loader for i in _ids(b)]
    second = [i for b in loader for i in _ids(b)]
    assert sorted(first) == sorted(second) == list(range(30)) and first != second


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_remaining_batches(tmp_path, packing):
    path = _json(tmp_path, 61)
    full = [_ids(b) for b in _loader(path, workers=2, packing=packing)]
    for k in (1, 4, 7):  # inside a window, at odd worker turns
        loader = _loader(path, workers=2, packing=packing)
        it = iter(loader)
        head = [_ids(next(it)) for _ in range(k)]
        state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store it as JSON-able data
        del it
        resumed = _loader(path, workers=2, packing=packing)
        resumed.load_state_dict(state)
        assert head + [_ids(b) for b in resumed] == full


def test_resume_requires_same_layout(tmp_path):
    path = _json(tmp_path, 10)
    state = _loader(path, workers=2).state_dict()
    with pytest.raises(ValueError, match="same world size"):
        _loader(path, workers=1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# real records through the real processor


def _jpeg(seed, size=(24, 40)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _turns(q, a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_bad_llava_records_skipped_and_counted(tmp_path, processor):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        (root / f"ok{i}.jpg").write_bytes(_jpeg(i))
    (root / "corrupt.jpg").write_bytes(_jpeg(9)[:300])  # a real JPEG cut short
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "outside.jpg").write_bytes(_jpeg(5))
    good = [
        {"id": f"ok{i}", "image": f"ok{i}.jpg", "conversations": _turns("<image>\nWhat?")} for i in range(4)
    ]
    good.append({"id": "text", "conversations": _turns("Hello?", "Hi.")})
    bad = [
        {"id": "c", "image": "corrupt.jpg", "conversations": _turns("<image>\nWhat?")},
        {"id": "g", "image": "garbage.jpg", "conversations": _turns("<image>\nWhat?")},
        {"id": "m", "image": "missing.jpg", "conversations": _turns("<image>\nWhat?")},
        {"id": "e", "image": "../outside.jpg", "conversations": _turns("<image>\nWhat?")},
        {"id": "a", "image": str(tmp_path / "outside.jpg"), "conversations": _turns("<image>\nWhat?")},
        {"id": "two", "image": "ok0.jpg", "conversations": _turns("<image>\n<image>\nWhat?")},
        {"id": "none", "image": "ok0.jpg", "conversations": _turns("What?")},
        {"id": "long", "image": "ok1.jpg", "conversations": _turns("<image>\nWhat?", "word " * 300)},
        {"id": "noconv"},
    ]
    lines = [json.dumps(r) for r in good + bad] + ['{"id": "broken", "conversations": [', "[1, 2"]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines))
    opts = DataOptions(
        json=str(path), image_root=str(root), template="vicuna_v1", max_length=200, batch_size=2
    )
    loader = build_dataloader(opts, processor)
    n_samples, n_images = 0, 0
    for batch in loader:
        n_samples += loader.last_batch_samples
        n_images += 0 if "image_grid_hw" not in batch else batch["image_grid_hw"].shape[0]
    assert (n_samples, n_images) == (5, 4)
    assert loader.stats() == {
        "corrupt_image": 2,
        "missing_image": 1,
        "path_escape": 2,
        "bad_image_placeholder": 2,
        "too_long": 1,
        "bad_record": 1,
        "broken_json": 2,
    }


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_truncation_and_teacher_views(tmp_path, processor):
    from train.teacher import TeacherView

    good = lambda k, i: [(f"{k}.jpg", _jpeg(i)), (f"{k}.txt", f"caption {i}".encode())]  # noqa: E731
    _tar(
        tmp_path / "a.tar",
        good("s0", 0) + good("s1", 1) + [("s2.jpg", _jpeg(2)), ("s2.json", b'{"caption": "json cap"}')],
    )
    _tar(
        tmp_path / "b.tar",
        good("s3", 3)
        + [("s4.jpg", _jpeg(4)[:200]), ("s4.txt", b"bad")]
        + [("s5.jpg", _jpeg(5))]
        + [("s6.jpg", _jpeg(6)), ("s6.json", b"{oops")],
    )
    _tar(tmp_path / "c.tar", good("s7", 7) + good("s8", 8) + good("s9", 9))
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-shard
    opts = DataOptions(
        shards=[str(tmp_path / "*.tar")], template="plain", max_length=64, batch_size=2, window=4
    )
    view = TeacherView(16, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    loader = build_dataloader(opts, processor, teacher_views=[view])
    n = 0
    for batch in loader:
        n += loader.last_batch_samples
        k = batch["image_grid_hw"].shape[0]
        assert batch["teacher_pixel_values"].shape == (k, 3, 16, 16)
        assert batch["teacher_image_boxes"].shape == (k, 4)
        assert (batch["input_ids"] == -200).sum() == sum(
            1 + h * (w + 1) for h, w in batch["image_grid_hw"].tolist()
        )
    stats = loader.stats()
    assert stats["truncated_shard"] == 1 and stats["corrupt_image"] == 1 and stats["broken_json"] == 1
    assert stats["missing_caption"] == 1
    assert n >= 5  # s0..s3 and s7 at least (what survives of c.tar depends on where the cut fell)


def test_images_behind_a_symlink_inside_the_root_are_read(tmp_path, processor):
    """A root that links to images elsewhere (as the demo links into site-packages) is not an escape."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(_jpeg(1))
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    path = tmp_path / "sft.json"
    path.write_text(
        json.dumps([{"id": "a", "image": "linked/a.jpg", "conversations": _turns("<image>\nQ?")}])
    )
    opts = DataOptions(
        json=str(path), image_root=str(root), template="vicuna_v1", max_length=200, batch_size=1
    )
    loader = build_dataloader(opts, processor)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["image_grid_hw"].shape[0] == 1
    assert loader.stats() == {}


# ----------------------------------------------------------------------------------------------
# reliability: one JSON reader, caption encodings, conversation shapes, epochs of good data,
# skipped.jsonl, oversized images


def test_record_count_uses_the_loaders_reader(tmp_path):
    """count_records reads JSON through train/records.py: a broken file names itself and the fix;
    a JSON-lines file counts the records the loader sees (broken lines included, as bad records)."""
    from train.build import count_records
    from train.config import RunConfig
    from train.records import load_json_records

    broken = tmp_path / "sft.json"
    broken.write_text('[{"id": "0", "conversations": []}, {"id": ')
    config = RunConfig()
    config.data.json = str(broken)
    with pytest.raises(ValueError, match=r"sft\.json is not valid JSON.*fix the file"):
        count_records(config)
    lines = tmp_path / "sft.jsonl"
    lines.write_text('{"id": "0", "conversations": []}\n\n{"id": \n{"id": "2", "conversations": []}\n')
    config.data.json = str(lines)
    assert count_records(config) == len(load_json_records(str(lines), None)) == 3
    config.data.max_samples = 2
    assert count_records(config) == 2


def test_non_utf8_captions_are_skipped_and_counted(tmp_path, processor):
    """Latin-1 and binary .txt captions and a Latin-1 .json caption are skipped as bad_caption_encoding,
    never trained as U+FFFD text; valid UTF-8 (non-ASCII included) is kept."""
    from train.records import Skips, iter_tar_records

    _tar(
        tmp_path / "a.tar",
        [("ok.jpg", _jpeg(0)), ("ok.txt", "Un café crème.".encode())]
        + [("latin.jpg", _jpeg(1)), ("latin.txt", "Un café crème.".encode("latin-1"))]
        + [("bin.jpg", _jpeg(2)), ("bin.txt", bytes(range(128, 256)))]
        + [("js.jpg", _jpeg(3)), ("js.json", '{"caption": "Crème brûlée."}'.encode("latin-1"))],
    )
    recs = {r.source.rsplit(":", 1)[1]: r for r in iter_tar_records(str(tmp_path / "a.tar"), Skips())}
    assert recs["ok"].error is None and recs["ok"].caption == "Un café crème."
    for key in ("latin", "bin", "js"):
        assert recs[key].error.reason == "bad_caption_encoding"
        assert f"a.tar:{key}" in str(recs[key].error) and "UTF-8" in str(recs[key].error)
    opts = DataOptions(shards=[str(tmp_path / "a.tar")], template="plain", max_length=64, batch_size=4)
    loader = build_dataloader(opts, processor)
    assert sum(1 for _ in loader) == 1 and loader.last_batch_samples == 1
    assert loader.stats() == {"bad_caption_encoding": 3}


def test_malformed_conversations_are_bad_conversation_records(tmp_path, processor):
    """Turns with a non-string value, no 'from', an unknown role or not a dict are refused by the reader
    (bad_conversation, the message names the record), never an encode_error inside the processor."""
    from train.records import load_json_records

    bad_turns = [
        [{"from": "human", "value": 5}, {"from": "gpt", "value": "A."}],
        [{"value": "Q?"}, {"from": "gpt", "value": "A."}],
        [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": None}],
        [{"from": "human", "value": "Q?"}, ["gpt", "A."]],
        [{"from": 1, "value": "Q?"}, {"from": "gpt", "value": "A."}],
        [],
    ]
    data = [{"id": "good", "conversations": _turns("Hello?", "Hi.")}]
    data += [{"id": f"b{i}", "conversations": c} for i, c in enumerate(bad_turns)]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(data))
    recs = load_json_records(str(path), None)
    assert recs[0].error is None
    for i, rec in enumerate(recs[1:]):
        assert rec.error is not None and rec.error.reason == "bad_conversation"
        assert f"sft.json#{i + 1} (id b{i})" in str(rec.error)
    opts = DataOptions(json=str(path), template="vicuna_v1", max_length=200, batch_size=4)
    loader = build_dataloader(opts, processor)
    assert sum(1 for _ in loader) == 1 and loader.last_batch_samples == 1
    assert loader.stats() == {"bad_conversation": len(bad_turns)}


def _mixed_json(tmp_path, n_good, n_bad):
    """Text-only SFT records, n_good good ones and n_bad with a non-string answer (bad_conversation)."""
    data = [{"id": f"g{i}", "conversations": _turns(f"Q{i}?", "Yes.")} for i in range(n_good)]
    data += [
        {"id": f"b{i}", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": i}]}
        for i in range(n_bad)
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    return str(path), [f"{path}#{n_good + i} (id b{i})" for i in range(n_bad)]


def test_epoch_end_reports_passes_over_the_good_data(tmp_path, processor, caplog):
    """12 records of which 4 are bad: train.epochs 1.5 is 1.5 x 12 / 8 = 2.25 passes over the good data."""
    path, _ = _mixed_json(tmp_path, 8, 4)
    opts = DataOptions(json=path, template="vicuna_v1", max_length=200, batch_size=3, window=5)
    loader = build_dataloader(opts, processor, epochs=1.5)
    with caplog.at_level("INFO", logger="train"):
        list(loader)
        list(loader)
    text = caplog.text
    assert (
        "epoch 1: 8 good samples of 12 records (4 skipped): train.epochs 1.5 is 2.25 passes over the "
        "good data" in text
    )
    assert "epoch 2: 8 good samples of 12 records (4 skipped)" in text
    # a max_steps run states the samples it will consume instead: 40 samples / 8 good = 5.00 passes
    caplog.clear()
    loader = build_dataloader(opts, processor, total_samples=40)
    with caplog.at_level("INFO", logger="train"):
        list(loader)
    assert "epoch 1: 8 good samples of 12 records (4 skipped): the run's 40 samples are 5.00 passes" in (
        caplog.text
    )


def _skipped(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_skipped_records_are_written_once_with_source_and_reason(tmp_path, processor):
    """skipped.jsonl: one line per bad record (source, reason, message), written in the first epoch only."""
    path, bad = _mixed_json(tmp_path, 7, 3)
    root = tmp_path / "images"
    root.mkdir()
    (root / "cut.jpg").write_bytes(_jpeg(1)[:300])
    data = json.loads(Path(path).read_text())
    data.append({"id": "cut", "image": "cut.jpg", "conversations": _turns("<image>\nQ?")})
    data.append({"id": "gone", "image": "gone.jpg", "conversations": _turns("<image>\nQ?")})
    Path(path).write_text(json.dumps(data))
    expected = {(s, "bad_conversation") for s in bad}
    expected |= {(f"{path}#10 (id cut)", "corrupt_image"), (f"{path}#11 (id gone)", "missing_image")}
    opts = DataOptions(
        json=path, image_root=str(root), template="vicuna_v1", max_length=200, batch_size=2, window=4
    )
    out = tmp_path / "run"
    loader = build_dataloader(opts, processor, log_dir=out)
    list(loader)
    list(loader)  # the second epoch writes nothing more
    lines = _skipped(out / "skipped.jsonl")
    assert sorted((d["source"], d["reason"]) for d in lines) == sorted(expected)
    assert all(d["message"].startswith(d["source"]) for d in lines)
    # each rank of a 2-rank run writes its own, rank-suffixed file with its share of the records
    two = tmp_path / "two"
    per_rank = []
    for rank in range(2):
        loader = build_dataloader(opts, processor, rank=rank, world_size=2, log_dir=two)
        list(loader)
        per_rank.append(_skipped(two / f"skipped.rank{rank}.jsonl"))
        assert len(per_rank[-1]) == sum(loader.stats().values())
    assert sorted((d["source"], d["reason"]) for d in per_rank[0] + per_rank[1]) == sorted(expected)
    assert not (two / "skipped.jsonl").exists()


def test_resumed_run_does_not_duplicate_skipped_lines(tmp_path, processor):
    """Resumed from a checkpoint taken mid-window, after more batches (and lines) than the checkpoint
    holds were consumed: the file ends exactly as an uninterrupted run's."""
    path, _ = _mixed_json(tmp_path, 9, 6)
    opts = DataOptions(json=path, template="vicuna_v1", max_length=200, batch_size=1, window=5)
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    list(build_dataloader(opts, processor, log_dir=full_dir))
    full = (full_dir / "skipped.jsonl").read_text()
    assert len(full.splitlines()) == 6
    for k in (1, 3, 5):
        shutil.rmtree(run_dir, ignore_errors=True)
        loader = build_dataloader(opts, processor, log_dir=run_dir)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        for _ in range(2):  # consumed after the checkpoint, then the run dies
            next(it)
        del it
        resumed = build_dataloader(opts, processor, log_dir=run_dir)
        resumed.load_state_dict(state)
        list(resumed)
        assert (run_dir / "skipped.jsonl").read_text() == full, k
        assert resumed.stats() == {"bad_conversation": 6}


def _big_png(path, side=8000):
    """A real side x side PNG of one colour (a few KB on disk, side^2 pixels once decoded)."""
    Image.new("L", (side, side), 200).save(path, optimize=False, compress_level=1)
    return path


def test_images_over_max_pixels_are_refused_before_decoding(tmp_path, processor, monkeypatch):
    """An 8,000 x 8,000 PNG (64 Mpx) over max_pixels 10 Mpx: skipped as image_too_large, from a JSON
    path and from tar bytes alike, without ever being decoded."""
    from PIL import ImageFile

    root = tmp_path / "images"
    root.mkdir()
    big = _big_png(root / "big.png")
    assert big.stat().st_size < 1_000_000
    (root / "ok.jpg").write_bytes(_jpeg(0))
    path = tmp_path / "sft.json"
    path.write_text(
        json.dumps(
            [
                {"id": "big", "image": "big.png", "conversations": _turns("<image>\nQ?")},
                {"id": "ok", "image": "ok.jpg", "conversations": _turns("<image>\nQ?")},
            ]
        )
    )
    _tar(tmp_path / "a.tar", [("big.png", big.read_bytes()), ("big.txt", b"A grey square.")])
    real_load = ImageFile.ImageFile.load

    def guarded_load(self):
        assert self.size[0] * self.size[1] <= 10_000_000, "an oversized image was decoded"
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    opts = DataOptions(json=str(path), image_root=str(root), template="vicuna_v1", max_pixels=10_000_000)
    loader = build_dataloader(opts, processor, log_dir=tmp_path / "run")
    assert sum(loader.last_batch_samples for _ in loader) == 1
    assert loader.stats() == {"image_too_large": 1}
    (line,) = _skipped(tmp_path / "run" / "skipped.jsonl")
    assert line["reason"] == "image_too_large" and "big.png" in line["message"]
    assert "8000 x 8000" in line["message"] and "max_pixels" in line["message"]
    opts = DataOptions(shards=[str(tmp_path / "a.tar")], template="plain", max_pixels=10_000_000)
    loader = build_dataloader(opts, processor)
    assert list(loader) == [] and loader.stats() == {"image_too_large": 1}
    assert DataOptions().max_pixels == 50_000_000
