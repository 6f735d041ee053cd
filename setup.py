"""EVE trainer: encoder-free vision-language models (model library, training engine, curation)."""

from setuptools import find_packages, setup

EXTRAS = {
    "train": [
        "deepspeed>=0.14",
        "peft>=0.13",  # LoRA (train/lora.py)
        "webdataset>=0.2.86",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    "curate": [
        "open_clip_torch>=2.24",
        "faiss-cpu>=1.8",
        "scikit-learn>=1.3",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    "gpu": ["flash-attn>=2.5", "faiss-gpu>=1.7"],
    # lmms-eval harness (eve/integrations/lmms.py); 0.7.3 imports filelock._api, which filelock 4 removed.
    "eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4"],
    # Web chat (eve/serve.py). gradio caps pillow below 13: with requirements/pins.txt (pillow 13) this
    # extra does not resolve, so `make install` installs gradio through requirements/serve.txt instead.
    "serve": ["gradio>=6.0,<7"],
    # selenium drives the web chat in a real browser (tests/eve/test_serve.py, `make browser`)
    "dev": ["pytest>=8", "ruff>=0.5", "scikit-image>=0.22", "gguf>=0.10", "selenium>=4.30"],
}

setup(
    name="eve-trainer",
    version="0.1.0",
    description="Open trainer for encoder-free vision-language models (EVE)",
    python_requires=">=3.10",
    packages=find_packages(include=["eve", "eve.*", "train", "train.*", "data_curation", "data_curation.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "pillow>=10",
        "numpy>=1.24",
    ],
    extras_require=EXTRAS,
    # `lmms-eval --model eve` finds the EVE adapter through this entry-point group (lmms-eval >= 0.7).
    entry_points={"lmms_eval.models": ["eve = eve.integrations.lmms:manifest"]},
)
