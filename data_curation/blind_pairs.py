"""Optional step after embed, blind_pairs: CLIP-blind image pairs (Eyes-Wide-Shut / MMVP).

A pair is "blind" when the embed step's features (a, CLIP-like) call the two images nearly the same
(cosine > `min_similarity_a`) while a second embedder (b, self-supervised) tells them apart (cosine
< `max_similarity_b`). Work is cut by the embed step's input shards: every rank embeds its shards
with b (`blind_pairs/embed_b/`), then mines the pairs whose first image lies in each of its shards
against that shard and all later ones (`blind_pairs/pairs/`); a finished shard's file is reused.
Rank 0 merges them into `pairs.jsonl`, `montage.png` and the annotation template `questions.json`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader

from .common import (
    Record,
    check_meta,
    decode_image,
    get_rank,
    my_shards,
    read_jsonl,
    record_timing,
    save_npy_atomic,
    wait_for_files,
    write_json_atomic,
    write_jsonl_atomic,
)
from .config import BlindPairsConfig, CurationConfig, step_main
from .embed import ImageDataset, _worker_init, build_extractor, feature_paths, pick_device
from .sources import load_scan

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the second embedder


class StagePool(nn.Module):
    """A timm model cut after one feature stage: (B, 3, S, S) -> its feature map averaged over space
    (B, C) or flattened (B, C * H * W, position-aware)."""

    def __init__(self, net: nn.Module, stage: int, pool: str):
        super().__init__()
        if pool not in ("mean", "flatten"):
            raise ValueError(f"blind_pairs.stage_pool {pool!r} is not one of mean, flatten")
        self.net, self.stage, self.pool = net, stage, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model up to `stage` and pool its feature map."""
        (fmap,) = self.net.forward_intermediates(x, indices=[self.stage], intermediates_only=True)
        return fmap.mean((2, 3)) if self.pool == "mean" else fmap.flatten(1)  # (B, C) or (B, C*H*W)


def build_second_extractor(bcfg: BlindPairsConfig, device: torch.device) -> tuple[nn.Module, int]:
    """The second embedder (b) and its input size: the configured model, or one of its stages."""
    ext, size = build_extractor(bcfg.embed, device)
    if bcfg.stage is not None:
        if bcfg.embed.backend != "timm":
            raise ValueError("blind_pairs.stage needs blind_pairs.embed.backend: timm")
        ext.net, ext.encode = StagePool(ext.net, bcfg.stage, bcfg.stage_pool), "forward"
    return ext, size


def b_paths(out: Path, i: int) -> tuple[Path, Path]:
    """(keys JSON, features .npy) of the second embedder for input shard i; the .npy is written last."""
    return (
        out / "blind_pairs" / "embed_b" / f"shard-{i:05d}.json",
        out / "blind_pairs" / "embed_b" / f"shard-{i:05d}.npy",
    )


def pairs_path(out: Path, i: int) -> Path:
    """Mined pairs whose first image lies in input shard i."""
    return out / "blind_pairs" / "pairs" / f"shard-{i:05d}.jsonl"


def embed_second(cfg: CurationConfig, shards: list[list[Record]], todo: list[int]) -> None:
    """Features of the second embedder for the images the embed step kept, cached per input shard."""
    if not todo:
        return
    device = pick_device(cfg.blind_pairs.embed.device)
    ext, size = build_second_extractor(cfg.blind_pairs, device)
    by_key = {r.key: r for i in todo for r in shards[i]}
    for i in todo:  # one loader per shard: a shard's features never depend on its neighbours
        keys = json.loads(feature_paths(cfg.out, i)[0].read_text())["keys"]
        records = [by_key[k] for k in keys]
        feats, valid = [], []
        if records:
            loader = DataLoader(
                ImageDataset(records, size),
                batch_size=cfg.blind_pairs.embed.batch_size,
                num_workers=cfg.blind_pairs.embed.num_workers,
                worker_init_fn=_worker_init,
            )
            for images, oks in loader:
                feats.append(ext(images.to(device)).cpu().numpy().astype(np.float16))
                valid.append(oks.numpy())
        keep = np.flatnonzero(np.concatenate(valid)) if valid else np.zeros(0, np.int64)
        kp, fp = b_paths(cfg.out, i)
        write_json_atomic(kp, {"keys": [keys[j] for j in keep]})
        save_npy_atomic(fp, np.concatenate(feats)[keep] if feats else np.zeros((0, 1), np.float16))


def load_pair_features(out: Path, i: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, a features, b features) of input shard i, rows with both, L2-normalised float32."""
    keys_a = json.loads(feature_paths(out, i)[0].read_text())["keys"]
    keys_b = json.loads(b_paths(out, i)[0].read_text())["keys"]
    fa, fb = (
        np.load(feature_paths(out, i)[1]).astype(np.float32),
        np.load(b_paths(out, i)[1]).astype(np.float32),
    )
    row = {k: j for j, k in enumerate(keys_a)}
    rows = np.array([row[k] for k in keys_b], np.int64)  # b keys are a subset of a keys, in order
    fa = fa[rows] if len(rows) else np.zeros((0, fa.shape[-1] if fa.ndim == 2 else 1), np.float32)
    return keys_b, normalise(fa), normalise(fb.reshape(len(keys_b), -1))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm again (the fp16 cache rounds them), float32, C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- mining


def neighbours_above(
    xq: np.ndarray, xb: np.ndarray, threshold: float, search: str = "range", k: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query row, database row, inner product) with inner product > threshold, by FAISS.

    `range`: exact range search. `knn`: k-NN (on all GPUs FAISS sees) and then, for rows whose k-th
    neighbour is still above the threshold (more than k matches), a range search: the same set.
    """
    import faiss

    xq, xb = np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(xb, np.float32)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(xq) == 0 or len(xb) == 0:
        return empty

    def range_rows(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        lims, sims, ids = index.range_search(q, threshold)  # inner product: keeps sims > threshold
        return np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))), ids.astype(np.int64), sims

    if search == "range":
        qi, bi, s = range_rows(xq)
    elif search == "knn":
        kk = min(k, len(xb))
        if faiss.get_num_gpus() > 0:
            sims, ids = faiss.knn_gpu(
                faiss.StandardGpuResources(), xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT
            )
        else:
            sims, ids = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)  # (nq, kk), best first
        full = sims[:, -1] > threshold if kk < len(xb) else np.zeros(len(xq), bool)
        hit = (sims > threshold) & ~full[:, None]
        qi, bi, s = np.nonzero(hit)[0], ids[hit].astype(np.int64), sims[hit]
        redo = np.flatnonzero(full)
        if len(redo):  # more than kk matches: these rows get the exact range search
            rq, rb, rs = range_rows(xq[redo])
            qi, bi, s = np.concatenate([qi, redo[rq]]), np.concatenate([bi, rb]), np.concatenate([s, rs])
    else:
        raise ValueError(f"blind_pairs.search {search!r} is not one of auto, range, knn")
    keep = s > threshold  # the same strict test on every path
    return qi[keep], bi[keep], s[keep]


def mine_block(
    qa: np.ndarray, qb: np.ndarray, da: np.ndarray, db: np.ndarray, bcfg: BlindPairsConfig, same: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blind pairs between query rows (qa, qb) and database rows (da, db): (i, j, sim a, sim b).

    `same`: query and database are the same rows; each unordered pair is kept once (i < j).
    """
    search = bcfg.search
    if search == "auto":
        import faiss

        search = "knn" if faiss.get_num_gpus() > 0 else "range"
    i, j, sa = neighbours_above(qa, da, bcfg.min_similarity_a, search, bcfg.knn_k)
    if same:
        i, j, sa = i[i < j], j[i < j], sa[i < j]
    sb = np.einsum("nd,nd->n", qb[i], db[j])  # (n,) cosine under b of the candidates only
    keep = sb < bcfg.max_similarity_b
    return i[keep], j[keep], sa[keep], sb[keep]


def mine_shard(cfg: CurationConfig, i: int, n_shards: int) -> list[dict]:
    """Blind pairs whose first image is in shard i and second in shard i (later row) or a later shard."""
    keys_i, qa, qb = load_pair_features(cfg.out, i)
    rows = []
    for j in range(i, n_shards):
        keys_j, da, db = (keys_i, qa, qb) if j == i else load_pair_features(cfg.out, j)
        for a, b, sa, sb in zip(*mine_block(qa, qb, da, db, cfg.blind_pairs, same=j == i)):
            rows.append(
                {"a": keys_i[a], "b": keys_j[b], "sim_a": round(float(sa), 6), "sim_b": round(float(sb), 6)}
            )
    return sorted(rows, key=lambda r: (r["a"], r["b"]))


def rank_pairs(rows: list[dict]) -> list[dict]:
    """Largest similarity gap (a - b) first, ties by keys: the order of the montage and the template."""
    return sorted(rows, key=lambda r: (-(r["sim_a"] - r["sim_b"]), r["a"], r["b"]))


# ---------------------------------------------------------------- outputs


def draw_montage(pairs: list[dict], by_key: dict[str, Record], path: Path, thumb: int = 128) -> None:
    """One row per pair, image a | image b, each labelled with both similarities below."""
    label_h = 16
    canvas = Image.new("RGB", (2 * thumb + 12, max(1, len(pairs)) * (thumb + label_h + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, p in enumerate(pairs):
        top = y * (thumb + label_h + 6)
        for x, key in enumerate((p["a"], p["b"])):
            rec = by_key[key]
            img = decode_image(rec.read_bytes(), rec.where(), draft_size=thumb)[0]
            img = img.resize((thumb, thumb), Image.BICUBIC) if max(img.size) < thumb else img
            img.thumbnail((thumb, thumb))
            left = x * (thumb + 12)
            canvas.paste(img, (left + (thumb - img.width) // 2, top + (thumb - img.height) // 2))
        draw.text((2, top + thumb + 2), f"#{y + 1}  a {p['sim_a']:.3f}  b {p['sim_b']:.3f}", fill=(0, 0, 0))
    canvas.save(path)


def question_template(pairs: list[dict], by_key: dict[str, Record]) -> list[dict]:
    """MMVP-style annotation template: two entries per pair (one per image), to be filled in by hand."""
    entries = []
    for n, p in enumerate(pairs):
        for side in ("a", "b"):
            rec = by_key[p[side]]
            entries.append(
                {
                    "index": len(entries) + 1,
                    "pair": n + 1,
                    "image": p[side],
                    "image_path": rec.where(),
                    "question": "",
                    "options": {"a": "", "b": ""},
                    "answer": None,
                    "sim_a": p["sim_a"],
                    "sim_b": p["sim_b"],
                }
            )
    return entries


def _check_meta(cfg: CurationConfig) -> None:
    """Refuse to mix features or pairs of different settings in one output folder."""
    b = cfg.blind_pairs
    meta = {k: getattr(b.embed, k) for k in ("backend", "model", "weights", "image_size")}
    meta.update(stage=b.stage, min_similarity_a=b.min_similarity_a, max_similarity_b=b.max_similarity_b)
    fix = "use a new out_dir or delete the blind_pairs/ folder"
    check_meta(cfg.out / "blind_pairs" / "meta.json", meta, "cached blind pairs", fix)


def run(cfg: CurationConfig, force: bool = False) -> dict:
    """Embed with b, mine this rank's shards, and (rank 0) merge; a no-op unless enabled or `force`."""
    if not (cfg.blind_pairs.enabled or force):
        return {}
    out = cfg.out / "blind_pairs"
    if (out / "_SUCCESS.json").exists():
        return json.loads((out / "_SUCCESS.json").read_text())
    t0 = time.time()
    shards = load_scan(cfg)
    n = len(shards)
    wait_for_files([feature_paths(cfg.out, i)[1] for i in range(n)], cfg.barrier_timeout_s, "the embed step")
    _check_meta(cfg)
    mine = my_shards(n)
    embed_second(cfg, shards, [i for i in mine if not b_paths(cfg.out, i)[1].exists()])
    todo = [i for i in mine if not pairs_path(cfg.out, i).exists()]
    if todo:  # shard i pairs with all later shards: wait for the other ranks' b features
        wait_for_files([b_paths(cfg.out, j)[1] for j in range(min(todo), n)], cfg.barrier_timeout_s,
                       "the blind_pairs features of every rank")  # fmt: skip
    for i in todo:
        write_jsonl_atomic(pairs_path(cfg.out, i), mine_shard(cfg, i, n))
    if get_rank()[0] != 0:
        record_timing(cfg.out, "blind_pairs", time.time() - t0, shards=len(todo))
        return {}
    wait_for_files([pairs_path(cfg.out, i) for i in range(n)], cfg.barrier_timeout_s, "the blind_pairs step")
    pairs = rank_pairs([r for i in range(n) for r in read_jsonl(pairs_path(cfg.out, i))])
    by_key = {r.key: r for s in shards for r in s}
    write_jsonl_atomic(
        out / "pairs.jsonl",
        [{**p, "image_a": by_key[p["a"]].where(), "image_b": by_key[p["b"]].where()} for p in pairs],
    )
    top = pairs[: cfg.blind_pairs.montage_pairs]
    draw_montage(top, by_key, out / "montage.png")
    n_template = cfg.blind_pairs.template_pairs or len(pairs)
    write_json_atomic(out / "questions.json", question_template(pairs[:n_template], by_key))
    images = sum(len(json.loads(b_paths(cfg.out, i)[0].read_text())["keys"]) for i in range(n))
    stats = {
        "pairs": len(pairs),
        "images": images,
        "montage_pairs": len(top),
        "template_pairs": min(n_template, len(pairs)),
    }
    write_json_atomic(out / "_SUCCESS.json", stats)
    record_timing(cfg.out, "blind_pairs", time.time() - t0, shards=len(todo))
    logger.info(
        "blind_pairs: %d pairs among %d images in %.1f s (%s)", len(pairs), images, time.time() - t0, out
    )
    return stats


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.blind_pairs --config X [overrides]` (runs even when not enabled)."""
    step_main(lambda cfg: run(cfg, force=True), argv)


if __name__ == "__main__":
    main()
