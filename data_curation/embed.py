"""Step 3, embed: L2-normalised image features per input shard, cached as `embed/shard-00000.npy`."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from eve.configuration_eve import IMAGENET_MEAN, IMAGENET_STD
from eve.encoders import load_timm_weights

from .common import (
    ImageDecodeError,
    Record,
    check_kept,
    check_meta,
    decode_image,
    get_rank,
    my_shards,
    record_timing,
    save_npy_atomic,
    wait_for_files,
    write_json_atomic,
)
from .config import CurationConfig, EmbedConfig, step_main
from .filter import load_filter
from .sources import load_scan

logger = logging.getLogger(__name__)

# Test hook: SIGKILL this process after this many shards are cached (a real, unclean interruption).
KILL_AFTER_ENV = "EVE_CURATION_KILL_AFTER_SHARDS"


def resolve_weights(spec: str | None) -> str | None:
    """A weights path; `asset:efficientnet_lite0` = the file of the efficientnet-lite0 package."""
    if spec is None:
        return None
    if spec == "asset:efficientnet_lite0":
        from eve.assets import efficientnet_lite0_weights_path  # paths only: no model code is imported

        return str(efficientnet_lite0_weights_path())
    if spec.startswith("asset:"):
        raise ValueError(
            f"unknown weights asset {spec!r}; known: asset:efficientnet_lite0, or give a file path"
        )
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"embed.weights {spec} does not exist; give a local weights file (nothing downloads)"
        )
    return spec


class FeatureExtractor(nn.Module):
    """uint8 images (B, 3, S, S) -> L2-normalised features (B, D), float32."""

    def __init__(self, net: nn.Module, encode: str, mean: tuple, std: tuple, dtype: torch.dtype | None):
        super().__init__()
        self.net, self.encode, self.dtype = net, encode, dtype
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise, run the network under autocast, pool and L2-normalise."""
        x = (images.float() - self.mean) / self.std  # (B, 3, S, S)
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            feats = getattr(self.net, self.encode)(x)  # (B, D), pooled
        return nn.functional.normalize(feats.float(), dim=-1)


def pick_device(spec: str) -> torch.device:
    """`auto` = this rank's GPU when CUDA is available, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision setting (None = fp32); fp16 has no fast CPU path, bf16 does."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"embed.precision {precision!r} is not one of auto, fp32, bf16, fp16")
    return table[precision]


def build_extractor(ecfg: EmbedConfig, device: torch.device) -> tuple[FeatureExtractor, int]:
    """The configured feature extractor (eval mode, on `device`) and its square input size."""
    weights = resolve_weights(ecfg.weights)
    if ecfg.backend == "timm":
        import timm

        net = timm.create_model(ecfg.model, pretrained=False, num_classes=0)  # num_classes=0: pooled features
        if weights:
            load_timm_weights(net, weights, ecfg.model)
        mean = tuple(net.pretrained_cfg.get("mean", IMAGENET_MEAN))
        std = tuple(net.pretrained_cfg.get("std", IMAGENET_STD))
        size = ecfg.image_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        encode = "forward"
    elif ecfg.backend == "open_clip":
        import open_clip

        # pretrained = a local file or None: open_clip never reaches the network for either.
        net = open_clip.create_model(ecfg.model, pretrained=weights, device="cpu")
        pcfg = getattr(net.visual, "preprocess_cfg", {}) or {}
        mean = tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD))
        native = net.visual.image_size
        size = ecfg.image_size or int(native[0] if isinstance(native, tuple | list) else native)
        encode = "encode_image"
    else:
        raise ValueError(f"embed.backend {ecfg.backend!r} is not one of timm, open_clip")
    if not weights:
        logger.warning(
            "embed: %s has random weights (embed.weights is null): fine for tests only", ecfg.model
        )
    ext = FeatureExtractor(net, encode, mean, std, autocast_dtype(ecfg.precision, device)).eval().to(device)
    return ext, size


def load_square(data: bytes, where: str, size: int) -> torch.Tensor:
    """Decode, resize the short side to `size` (bicubic) and centre-crop: uint8 (3, size, size)."""
    img, _, _, _ = decode_image(data, where, draft_size=size)
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)))  # (S, S, 3) uint8
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Records -> (uint8 image (3, S, S), ok); a file that fails to decode gives (zeros, False)."""

    def __init__(self, records: list[Record], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        rec = self.records[i]
        try:
            return load_square(rec.read_bytes(), rec.where(), self.size), True
        except (ImageDecodeError, OSError) as e:
            logger.warning("embed: %s", e)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def _worker_init(_: int) -> None:
    """One thread per decoding worker: the cores belong to the model."""
    torch.set_num_threads(1)


def feature_paths(out: Path, i: int) -> tuple[Path, Path]:
    """(keys JSON, features .npy) of input shard i; the .npy is written last and marks completion."""
    return out / "embed" / f"shard-{i:05d}.json", out / "embed" / f"shard-{i:05d}.npy"


def load_features(cfg: CurationConfig, n_shards: int) -> tuple[list[str], np.ndarray]:
    """All cached features in input-shard order: (keys, (N, D) float32); waits for every rank."""
    paths = [feature_paths(cfg.out, i) for i in range(n_shards)]
    wait_for_files([p[1] for p in paths], cfg.barrier_timeout_s, "the embed step of every rank")
    keys: list[str] = []
    feats = []
    for kp, fp in paths:
        keys += json.loads(kp.read_text())["keys"]
        feats.append(np.load(fp).astype(np.float32))
    return keys, np.concatenate(feats, 0)


def _check_meta(cfg: CurationConfig) -> None:
    """Refuse to mix features of different extractors in one output folder."""
    meta = {k: getattr(cfg.embed, k) for k in ("backend", "model", "weights", "image_size")}
    fix = "use a new out_dir or delete the embed/ folder (and later steps)"
    check_meta(cfg.out / "embed" / "meta.json", meta, "cached features", fix)


def run(cfg: CurationConfig) -> None:
    """Embed this rank's input shards that have no cached features yet."""
    t0 = time.time()
    shards = load_scan(cfg)
    filt = load_filter(cfg, len(shards))
    status = Counter(r["status"] for rows in filt for r in rows)
    check_kept(
        "filter",
        status["ok"],
        f"{status.total()} scanned",
        status,
        f"lower filter.min_side (now {cfg.filter.min_side}) or check the sources and the warnings above",
    )
    _check_meta(cfg)
    todo = [i for i in my_shards(len(shards)) if not feature_paths(cfg.out, i)[1].exists()]
    if not todo:
        record_timing(cfg.out, "embed", time.time() - t0, images=0)
        return
    ok = {i: {r["key"] for r in filt[i] if r["status"] == "ok"} for i in todo}
    records, batches, owner = [], [], []
    bs = cfg.embed.batch_size
    for i in todo:
        recs = [r for r in shards[i] if r.key in ok[i]]
        start = len(records)
        records += recs
        # Batches never cross input shards: a shard's features do not depend on its neighbours.
        batches += [list(range(start + j, start + min(j + bs, len(recs)))) for j in range(0, len(recs), bs)]
        owner.append((i, start, start + len(recs)))
    device = pick_device(cfg.embed.device)
    ext, size = build_extractor(cfg.embed, device)
    dim = int(ext(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)).shape[-1])
    loader = DataLoader(
        ImageDataset(records, size),
        batch_sampler=batches,
        num_workers=cfg.embed.num_workers,
        worker_init_fn=_worker_init,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    feats = np.zeros((len(records), dim), np.float16)  # fp16 on disk: halves the cache, ample for K-means
    valid = np.zeros(len(records), bool)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
    done, next_owner = 0, 0
    pos = 0
    bar = tqdm(total=len(records), desc=f"embed r{get_rank()[0]}", unit="img")

    def flush_ready(upto: int) -> None:
        nonlocal next_owner, done
        while next_owner < len(owner) and owner[next_owner][2] <= upto:
            i, a, b = owner[next_owner]
            keep = np.flatnonzero(valid[a:b]) + a
            kp, fp = feature_paths(cfg.out, i)
            errors = [records[j].key for j in range(a, b) if not valid[j]]
            write_json_atomic(
                kp, {"keys": [records[j].key for j in keep], "embed_errors": errors, "dim": dim}
            )
            save_npy_atomic(fp, feats[keep])
            next_owner += 1
            done += 1
            if kill_after and done >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    flush_ready(0)  # shards with no image left after filtering
    for images, oks in loader:
        n = images.shape[0]
        feats[pos : pos + n] = ext(images.to(device, non_blocking=True)).cpu().numpy()
        valid[pos : pos + n] = oks.numpy()
        pos += n
        bar.update(n)
        flush_ready(pos)
    bar.close()
    flush_ready(pos)
    dt = time.time() - t0
    logger.info(
        "embed: %d images in %d shards, %.1f s (%.0f img/s), dim %d",
        len(records),
        len(todo),
        dt,
        len(records) / max(dt, 1e-9),
        dim,
    )
    record_timing(cfg.out, "embed", dt, images=len(records))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.embed --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
