"""Data: bad records skipped and counted, ranks x workers partition, resume, webdataset shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataOptions, EveDataLoader, EveDataset, Record, build_dataloader
from train.packing import Collator


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
