"""Step 6, captions: source captions or EVE re-captions, then repetition / unfinished / similarity filters."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from eve.inference import generate_all, load_model

from .common import (
    Record,
    check_kept,
    decode_image,
    get_rank,
    my_shards,
    read_jsonl,
    record_timing,
    wait_for_files,
    write_json_atomic,
    write_jsonl_atomic,
)
from .config import CaptionConfig, CurationConfig, step_main
from .embed import load_features
from .sources import load_scan

CAPTION_DROP_REASONS = (
    "no_caption",
    "caption_unfinished",
    "caption_repetitive",
    "caption_low_similarity",
    "caption_image_error",
)

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[\w']+")
# A finished sentence ends in . ! ? (or an ellipsis-free closing quote / bracket after one).
_TERMINAL = re.compile(r"[.!?][\"'”’)\]]*$")
# Words that cannot end a finished English sentence: a caption ending in one was cut mid-sentence.
_DANGLING = {
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "with",
    "in",
    "on",
    "at",
    "to",
    "for",
    "from",
    "by",
    "is",
    "are",
    "its",
    "their",
    "his",
    "her",
}


def is_repetitive(
    caption: str, ngram_size: int = 3, max_ngram_repeats: int = 2, max_word_run: int = 3
) -> bool:
    """True when a word n-gram occurs more than max_ngram_repeats times, or a word runs more than max_word_run times."""
    words = [w.lower() for w in _WORD.findall(caption)]
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run > max_word_run:
            return True
    grams = Counter(tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1))
    return bool(grams) and max(grams.values()) > max_ngram_repeats


def is_unfinished(caption: str, min_words: int = 2) -> bool:
    """True when the caption is too short, lacks terminal punctuation, or ends on a dangling word."""
    text = caption.strip()
    words = _WORD.findall(text.lower())
    if len(words) < min_words or not _TERMINAL.search(text) or text.endswith(("...", "…")):
        return True
    return words[-1] in _DANGLING


def caption_problem(caption: str | None, cfg: CaptionConfig) -> str | None:
    """The drop reason of a caption (None = keep)."""
    if not caption or not caption.strip():
        return "no_caption"
    if is_repetitive(caption, cfg.ngram_size, cfg.max_ngram_repeats, cfg.max_word_run):
        return "caption_repetitive"
    if is_unfinished(caption, cfg.min_words):
        return "caption_unfinished"
    return None


def recaption_eve(records: list[Record], cfg: CaptionConfig) -> list[str | None]:
    """Captions from an exported EVE checkpoint (batched greedy generate); None where the image fails."""
    if not cfg.eve_model or not Path(cfg.eve_model, "config.json").is_file():
        raise FileNotFoundError(
            f"captions.eve_model={cfg.eve_model!r} is not an exported EVE checkpoint (no config.json)"
        )
    model, processor = load_model(cfg.eve_model)
    prompt = processor.build_prompt(cfg.eve_prompt, cfg.eve_template, has_image=True)
    # Images are decoded a batch at a time; one that fails is logged and gets no caption.
    images = [lambda r=r: decode_image(r.read_bytes(), r.where())[0] for r in records]
    return generate_all(
        model,
        processor,
        [prompt] * len(records),
        images,
        cfg.eve_batch_size,
        cfg.eve_max_new_tokens,
        progress=True,
        desc="recaption",
    )


def clip_similarity(records: list[Record], captions: list[str], cfg: CaptionConfig) -> np.ndarray:
    """Image-text cosine similarity (N,) from an open_clip model with local weights (NaN where the image fails)."""
    import open_clip
    import torch

    from .embed import resolve_weights

    model = open_clip.create_model(
        cfg.clip_model, pretrained=resolve_weights(cfg.clip_weights), device="cpu"
    ).eval()
    tokenizer = open_clip.get_tokenizer(cfg.clip_model)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(pcfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    from .embed import load_square

    sims = np.full(len(records), np.nan, np.float32)
    bs = 64
    for a in range(0, len(records), bs):
        imgs, idx = [], []
        for j in range(a, min(a + bs, len(records))):
            try:
                imgs.append(load_square(records[j].read_bytes(), records[j].where(), size))
                idx.append(j)
            except (ValueError, OSError) as e:
                logger.warning("clip filter: %s", e)
        if not imgs:
            continue
        with torch.no_grad():
            x = (torch.stack(imgs).float() / 255.0 - mean) / std  # (B, 3, S, S)
            fi = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            ft = torch.nn.functional.normalize(
                model.encode_text(tokenizer([captions[j] for j in idx])).float(), dim=-1
            )
            sims[idx] = (fi * ft).sum(-1).numpy()
    return sims


def part_path(out: Path, i: int) -> Path:
    """Caption results of selected rows [i * captions.part_size, (i + 1) * captions.part_size)."""
    return out / "captions" / f"part-{i:05d}.jsonl"


def load_selected_records(cfg: CurationConfig) -> tuple[list[dict], dict[str, Record]]:
    """The selected rows as {row, key, cluster, distance} plus the scan records by key."""
    from .selection import load_cluster

    shards = load_scan(cfg)
    wait_for_files([cfg.out / "select" / "_SUCCESS.json"], cfg.barrier_timeout_s, "the select step")
    keys, _ = load_features(cfg, len(shards))
    labels, dist, _ = load_cluster(cfg)
    rows = np.load(cfg.out / "select" / "selected.npy")
    sel = [
        {"row": int(r), "key": keys[r], "cluster": int(labels[r]), "distance": float(dist[r])} for r in rows
    ]
    by_key = {r.key: r for shard in shards for r in shard}
    return sel, by_key


def load_captions(cfg: CurationConfig) -> list[dict]:
    """All caption rows (in selection order), written by this step."""
    done = cfg.out / "captions" / "_SUCCESS.json"
    wait_for_files([done], cfg.barrier_timeout_s, "the captions step")
    n = json.loads(done.read_text())["parts"]
    return [row for i in range(n) for row in read_jsonl(part_path(cfg.out, i))]


def caption_part(rows: list[dict], recs: list[Record], cfg: CaptionConfig) -> list[dict]:
    """Caption one part's selected rows and give each a status (`ok` or a drop reason)."""
    if cfg.mode == "eve":
        caps, source = recaption_eve(recs, cfg), "eve"
    else:
        caps, source = [r.caption for r in recs], "source"
    for row, cap in zip(rows, caps):
        row["caption"], row["caption_source"] = cap, source
        row["status"] = caption_problem(cap, cfg) or "ok"
    if cfg.clip_model:
        live = [j for j, row in enumerate(rows) if row["status"] == "ok"]
        sims = clip_similarity([recs[j] for j in live], [rows[j]["caption"] for j in live], cfg)
        for j, s in zip(live, sims):
            rows[j]["clip_similarity"] = None if np.isnan(s) else float(s)
            if np.isnan(s):
                rows[j]["status"] = "caption_image_error"
            elif s < cfg.clip_min_similarity:
                rows[j]["status"] = "caption_low_similarity"
    return rows


def run(cfg: CurationConfig) -> None:
    """Caption and filter the selected images, part by part: part p on rank p % world size (finished
    parts are kept); rank 0 waits for every part and marks the step done."""
    done = cfg.out / "captions" / "_SUCCESS.json"
    if done.exists():
        return
    if cfg.captions.mode not in ("source", "eve"):
        raise ValueError(f"captions.mode {cfg.captions.mode!r} is not one of source, eve")
    t0 = time.time()
    sel, by_key = load_selected_records(cfg)
    size = cfg.captions.part_size
    n_parts = (len(sel) + size - 1) // size
    counts: Counter = Counter()
    for p in my_shards(n_parts):
        if part_path(cfg.out, p).exists():
            continue
        rows = sel[p * size : (p + 1) * size]
        rows = caption_part(rows, [by_key[r["key"]] for r in rows], cfg.captions)
        counts.update(r["status"] for r in rows)
        write_jsonl_atomic(part_path(cfg.out, p), rows)
    record_timing(cfg.out, "captions", time.time() - t0, images=counts.total())
    if get_rank()[0] != 0:
        return
    parts = [part_path(cfg.out, p) for p in range(n_parts)]
    wait_for_files(parts, cfg.barrier_timeout_s, "the captions step of every rank")
    # Parts finished before an interruption count too; no _SUCCESS when nothing is kept, so a re-run
    # (after deleting captions/ with other caption settings) is not taken as done.
    status = Counter(r["status"] for p in parts for r in read_jsonl(p))
    check_kept(
        "captions",
        status["ok"],
        f"{len(sel)} selected",
        status,
        f"check the captions of the sources (captions.mode {cfg.captions.mode!r}) and the captions.* "
        f"filter settings, then delete {cfg.out / 'captions'} and re-run",
    )
    write_json_atomic(done, {"parts": n_parts, "selected": len(sel)})
    logger.info("captions: %d selected, %s", len(sel), dict(status))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.captions --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
