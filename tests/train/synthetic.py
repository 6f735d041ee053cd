"""Small real training files for engine tests: PNG + caption webdataset tars and a LLaVA JSON.

The images are real PNG files (drawn shapes of several sizes and aspect ratios); the JSON mixes
text-only and image conversations, so that image-free micro-batches occur.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")

# The tiny test model (tests/conftest.py TINY_OVERRIDES): 2 layers, width 64, 32-px images (4x4 grid).
TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vision_hidden_size": 32,
    "vision_num_heads": 4,
    "vision_patch_size": 4,
    "vision_conv_stride": 2,
    "max_image_size": 32,
}


def draw(i: int) -> tuple[Image.Image, str]:
    """Image i: a coloured shape on a light background (sizes/aspects vary) and its caption."""
    colour = list(COLOURS)[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    h, w = [(32, 32), (24, 40), (48, 20), (64, 64)][i % 4]
    a = np.full((h, w, 3), 235, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h / 2, w / 2, min(h, w) / 3
    if shape == "square":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    else:
        mask = abs(yy - cy) < r / 3
    a[mask] = COLOURS[colour]
    return Image.fromarray(a), f"A {colour} {shape} on a light background."


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, n_samples: int = 24, per_shard: int = 12) -> list[str]:
    """webdataset tars `shard-XXXXXX.tar` of {key}.png + {key}.txt; returns the glob pattern list."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n_samples, per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, n_samples)):
                image, caption = draw(i)
                for ext, data in (("png", png_bytes(image)), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return [str(root / "shard-*.tar")]


def write_llava_json(root: Path, n_samples: int = 16) -> Path:
    """images/*.png + sft.json: every third sample is text-only; image samples ask colour and shape."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_samples):
        image, caption = draw(i)
        colour, shape = caption.split()[1:3]
        if i % 3 == 2:
            records.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"from": "human", "value": f"What colour is a {colour} {shape}?"},
                        {"from": "gpt", "value": colour},
                    ],
                }
            )
            continue
        image.save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": f"img-{i}",
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "What shape is it?"},
                    {"from": "gpt", "value": shape},
                ],
            }
        )
    path = root / "sft.json"
    path.write_text(json.dumps(records))
    return path


def tiny_run_config(tmp_path: Path, stage: str = "stage1", **sections) -> dict:
    """A YAML-ready config tree for the tiny test model on files under tmp_path."""
    tree = {
        "model": {"preset": "tiny", "overrides": dict(TINY_MODEL)},
        "stage": {"name": stage},
        "data": {"max_length": 256, "packing": True, "shuffle": True, "window": 8},
        "teachers": [{"backend": "timm", "name": "efficientnet_lite0", "layer": -2, "image_size": 64}],
        "aligning": {"layer_step": 1, "num_heads": 8},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 4,
            "seed": 0,
            "save_every": 0,
            "output_dir": str(tmp_path / "run"),
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return tree


def write_yaml(path: Path, tree: dict) -> str:
    """Write a config tree as YAML; its path as a string (for `--config`)."""
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def stage1_config_file(tmp_path: Path, name: str, **train) -> str:
    """A stage-1 run on 24 shard samples, checkpoints every 2 steps, into tmp_path/name; its YAML path."""
    shards = write_shards(tmp_path / "shards", n_samples=24, per_shard=8)
    tree = tiny_run_config(
        tmp_path,
        "stage1",
        data={"shards": shards, "window": 8},
        train={"max_steps": 8, "save_every": 2, "keep_last": 2, "output_dir": str(tmp_path / name), **train},
    )
    return write_yaml(tmp_path / f"{name}.yaml", tree)


LOGGED = ("step", "loss", "ce_loss", "align_loss", "lr")  # not tokens_per_s: a timing


def losses(run_dir: Path) -> list[dict]:
    """The logged losses and LRs of a run, for exact comparisons between runs."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in LOGGED} for r in rows]
