"""CLIP-blind pair mining: FAISS search == brute force, thresholds, resume, outputs, a real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation.blind_pairs import mine_block, neighbours_above, pairs_path
from data_curation.common import read_jsonl
from data_curation.config import BlindPairsConfig, parse_step_args

REPO = Path(__file__).resolve().parents[2]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """n random unit rows in two spaces, plus planted pairs: some alike in both spaces (not blind),
    some alike in a and unlike in b (blind). Returns (fa, fb, the blind pairs by construction)."""
    rng = np.random.default_rng(seed)
    fa, fb = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))
    blind = set()
    for k, (i, j) in enumerate(
        rng.choice(np.arange(1, n - 10), size=(12, 2), replace=False)
    ):  # 24 distinct rows
        fa[j] = unit(fa[i : i + 1] + 0.05 * rng.normal(size=(1, d)) / np.sqrt(d))[0]  # cos ~ 0.999
        if k % 2:  # also alike in b: not blind
            fb[j] = unit(fb[i : i + 1] + 0.05 * rng.normal(size=(1, d)) / np.sqrt(d))[0]
        else:
            blind.add((min(i, j), max(i, j)))
    return fa, fb, blind


def brute_force(fa: np.ndarray, fb: np.ndarray, ta: float, tb: float) -> set[tuple[int, int]]:
    """Every unordered pair by a double loop in float64."""
    a, b = fa.astype(np.float64), fb.astype(np.float64)
    out = set()
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i] @ a[j] > ta and b[i] @ b[j] < tb:
                out.add((i, j))
    return out


@pytest.mark.parametrize("search, k", [("range", 256), ("knn", 256), ("knn", 2)])
def test_mining_equals_brute_force_and_planted_pairs(search, k):
    """Planted blind pairs among 300 random rows: FAISS finds exactly them; k=2 forces the range redo."""
    fa, fb, blind = planted(300, 32, seed=0)
    # Rows 290-293 copy row 0 in a and differ from it in b: row 0 has 5 matches, more than k=2.
    fa[290:294], fb[290:294] = fa[0], unit(np.eye(32)[:4] - fb[0])  # alike in a, unlike in b
    cfg = BlindPairsConfig(search=search, knn_k=k)
    i, j, sa, sb = mine_block(fa, fb, fa, fb, cfg, same=True)
    got = set(zip(i.tolist(), j.tolist()))
    want = brute_force(fa, fb, 0.95, 0.6)
    assert blind <= want and len(want) > len(blind)  # planted ones plus the copies of row 0
    assert got == want and len(got) == len(i)  # no pair twice
    np.testing.assert_allclose(sa, np.einsum("nd,nd->n", fa[i], fa[j]), atol=1e-5)  # float32 dots
    np.testing.assert_allclose(sb, np.einsum("nd,nd->n", fb[i], fb[j]), atol=1e-5)


@pytest.mark.parametrize("ta, tb", [(0.5, 0.1), (0.2, 0.0), (0.0, 0.3)])
def test_thresholds_respected_across_blocks(ta, tb):
    """Low-dimensional rows give many pairs near any threshold: split into two blocks (as two input
    shards), the union of the three block searches is the brute-force set, every pair within bounds."""
    rng = np.random.default_rng(1)
    fa, fb = unit(rng.normal(size=(120, 3))), unit(rng.normal(size=(120, 3)))
    cfg = BlindPairsConfig(min_similarity_a=ta, max_similarity_b=tb)
    got = set()
    for (a0, a1), (b0, b1) in (((0, 50), (0, 50)), ((0, 50), (50, 120)), ((50, 120), (50, 120))):
        i, j, sa, sb = mine_block(fa[a0:a1], fb[a0:a1], fa[b0:b1], fb[b0:b1], cfg, same=a0 == b0)
        assert (sa > ta).all() and (sb < tb).all()
        got |= {(a0 + x, b0 + y) for x, y in zip(i.tolist(), j.tolist())}
    want = brute_force(fa, fb, ta, tb)
    assert got == want and len(want) > 20


def test_neighbours_above_is_strict_and_handles_empty():
    """Inner product equal to the threshold is not above it; empty inputs give nothing."""
    x = unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    qi, bi, s = neighbours_above(x, x, 0.0, "range")
    assert sorted(zip(qi.tolist(), bi.tolist())) == [(0, 0), (1, 1)]  # the orthogonal pair (dot 0) is out
    assert len(neighbours_above(x[:0], x, 0.5, "range")[0]) == 0
    with pytest.raises(ValueError, match="blind_pairs.search"):
        neighbours_above(x, x, 0.5, "nope")


# ---------------------------------------------------------------- the step on real images


def easy_vqa_overrides(src: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """32 real easy-vqa images in 4 input shards; a = lite0 final features, b = its stage 3 map, 32 px."""
    sources = json.dumps([{"type": "folder", "path": str(src), "name": "ev"}])
    return [
        f"--out_dir={out}", f"--sources={sources}", "--scan.shard_size=8", "--filter.min_side=16",
        "--filter.num_workers=0", "--embed.backend=timm", "--embed.model=efficientnet_lite0",
        "--embed.weights=asset:efficientnet_lite0", "--embed.image_size=32", "--embed.num_workers=0",
        "--embed.batch_size=8", "--cluster.k=4", "--cluster.iterations=5", "--select.per_cluster=8",
        "--shard.samples_per_shard=16", "--barrier_timeout_s=60", "--blind_pairs.enabled=true",
        "--blind_pairs.embed.backend=timm", "--blind_pairs.embed.model=efficientnet_lite0",
        "--blind_pairs.embed.weights=asset:efficientnet_lite0", "--blind_pairs.embed.image_size=32",
        "--blind_pairs.embed.num_workers=0", "--blind_pairs.stage=3", "--blind_pairs.stage_pool=flatten", "--blind_pairs.min_similarity_a=0.9",
        "--blind_pairs.max_similarity_b=0.9", "--blind_pairs.montage_pairs=5", "--blind_pairs.template_pairs=3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def easy_vqa_run(tmp_path_factory):
    """One full `data_curation.run` with the step enabled on 32 easy-vqa train images (one thread)."""
    from data_curation import run
    from eve.assets import easy_vqa_dir

    root = tmp_path_factory.mktemp("blind")
    src = root / "src"
    src.mkdir()
    for i in range(32):
        shutil.copy(easy_vqa_dir("train") / "images" / f"{i}.png", src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"Easy image number {i}.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run.main(easy_vqa_overrides(src, root / "out"))
    finally:
        torch.set_num_threads(threads)
    return root


def test_end_to_end_outputs_match_features(easy_vqa_run):
    """pairs.jsonl is exactly the brute-force set over the cached features of both embedders; the
    montage has one row per top pair, the template two empty entries per pair; the report shows it."""
    from data_curation.blind_pairs import load_pair_features

    out = easy_vqa_run / "out"
    keys, fa, fb = [], [], []
    for i in range(4):
        k, a, b = load_pair_features(out, i)
        keys += k
        fa.append(a)
        fb.append(b)
    assert len(keys) == 32
    fa, fb = np.concatenate(fa), np.concatenate(fb)
    want = {(keys[i], keys[j]) for i, j in brute_force(fa, fb, 0.9, 0.9)}
    pairs = read_jsonl(out / "blind_pairs" / "pairs.jsonl")
    assert {(p["a"], p["b"]) for p in pairs} == want and len(pairs) == len(want) >= 5
    assert all(p["sim_a"] > 0.9 and p["sim_b"] < 0.9 for p in pairs)
    gaps = [p["sim_a"] - p["sim_b"] for p in pairs]
    assert gaps == sorted(gaps, reverse=True)
    assert all(Path(p["image_a"]).is_file() for p in pairs)
    w, h = Image.open(out / "blind_pairs" / "montage.png").size
    assert (w, h) == (2 * 128 + 12, 5 * (128 + 16 + 6))  # 5 rows of two 128 px thumbnails + label
    template = json.loads((out / "blind_pairs" / "questions.json").read_text())
    assert len(template) == 2 * 3
    assert [(t["pair"], t["image"]) for t in template] == [
        (n + 1, pairs[n][side]) for n in range(3) for side in ("a", "b")
    ]
    assert all(
        t["question"] == "" and t["answer"] is None and t["options"] == {"a": "", "b": ""} for t in template
    )
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["blind_pairs"]["pairs"] == len(pairs) and "blind_pairs" in report["timings_s"]
    assert Image.open(out / "report" / "blind_pairs.png").size == (w, h)


def test_resume_reuses_a_finished_shard(easy_vqa_run, tmp_path):
    """Delete the merged outputs and one shard's pairs, plant a marker row in another shard's pairs:
    the re-run recomputes the deleted shard identically and keeps the planted (finished) one as is."""
    from data_curation.blind_pairs import run

    out = tmp_path / "out"
    shutil.copytree(easy_vqa_run / "out", out)
    cfg, _ = parse_step_args(easy_vqa_overrides(easy_vqa_run / "src", out))
    before = pairs_path(out, 1).read_text()
    for p in ("_SUCCESS.json", "pairs.jsonl", "questions.json", "montage.png"):
        (out / "blind_pairs" / p).unlink()
    pairs_path(out, 1).unlink()
    marker = {"a": "ev/0", "b": "ev/31", "sim_a": 0.99, "sim_b": 0.01}
    pairs_path(out, 0).write_text(pairs_path(out, 0).read_text() + json.dumps(marker) + "\n")
    stats = run(cfg)
    assert pairs_path(out, 1).read_text() == before
    merged = read_jsonl(out / "blind_pairs" / "pairs.jsonl")
    assert merged[0]["a"] == "ev/0" and merged[0]["b"] == "ev/31"  # largest gap: first
    assert stats["pairs"] == len(read_jsonl(easy_vqa_run / "out" / "blind_pairs" / "pairs.jsonl")) + 1


def test_changed_thresholds_are_an_error(easy_vqa_run, tmp_path):
    """Cached pairs are reused only for the same embedder and thresholds."""
    from data_curation.blind_pairs import run

    out = tmp_path / "out"
    shutil.copytree(easy_vqa_run / "out", out)
    (out / "blind_pairs" / "_SUCCESS.json").unlink()
    cfg, _ = parse_step_args(
        easy_vqa_overrides(easy_vqa_run / "src", out, ("--blind_pairs.max_similarity_b=0.5",))
    )
    with pytest.raises(ValueError, match="delete the blind_pairs/ folder"):
        run(cfg)


def test_disabled_by_default_and_shipped_configs():
    """Off unless enabled; the shipped configs parse, with DINOv2 as the LAION second embedder."""
    from data_curation.config import load_config

    assert not BlindPairsConfig().enabled
    assert (BlindPairsConfig().min_similarity_a, BlindPairsConfig().max_similarity_b) == (0.95, 0.6)
    laion = load_config(REPO / "configs/curation/laion.yaml")
    assert "dinov2" in laion.blind_pairs.embed.model
    emb = load_config(REPO / "configs/curation/embedded.yaml")
    assert emb.blind_pairs.embed.model == "efficientnet_lite0" and emb.blind_pairs.stage is not None
