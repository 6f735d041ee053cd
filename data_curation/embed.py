"""Step 3, embed: L2-normalised image features per input shard, cached as `embed/shard-00000.npy`.

The features were computed by the filter step from its one decode of each image
(`filter/features-00000.npy`, every image that passed the checks); this step keeps the rows of the
images that are not exact duplicates, once every rank has filtered. It also holds the feature
extractors and their input preprocessing, used by the filter, blind_pairs and captions steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from eve.configuration_eve import IMAGENET_MEAN, IMAGENET_STD
from eve.encoders import load_timm_weights

from .common import (
    ImageDecodeError,
    Record,
    check_kept,
    decode_image,
    my_shards,
    record_timing,
    save_npy_atomic,
    square_crop,
    wait_for_files,
    write_json_atomic,
)
from .config import CurationConfig, EmbedConfig, step_main
from .filter import load_filter, passed_features_path
from .sources import load_scan

logger = logging.getLogger(__name__)


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
    """Decode (JPEG DCT-scaled towards `size`), resize the short side to `size` and centre-crop: uint8 (3, size, size)."""
    return torch.from_numpy(square_crop(decode_image(data, where, draft_size=size).image, size))


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


def run(cfg: CurationConfig) -> None:
    """Cache the features of this rank's input shards without exact duplicates (shards done are skipped)."""
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
    todo = [i for i in my_shards(len(shards)) if not feature_paths(cfg.out, i)[1].exists()]
    n = 0
    for i in todo:
        # One feature row per image that passed the filter's checks: the rows now "ok" or "duplicate".
        passed = [r for r in filt[i] if r["status"] in ("ok", "duplicate")]
        feats = np.load(passed_features_path(cfg.out, i))  # (len(passed), D) fp16
        keep = [j for j, r in enumerate(passed) if r["status"] == "ok"]
        kp, fp = feature_paths(cfg.out, i)
        write_json_atomic(kp, {"keys": [passed[j]["key"] for j in keep], "dim": int(feats.shape[1])})
        save_npy_atomic(fp, feats[keep])
        n += len(keep)
    record_timing(cfg.out, "embed", time.time() - t0, images=n)


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.embed --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
