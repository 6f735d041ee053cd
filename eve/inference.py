"""Inference on an exported EVE checkpoint: load it, build prompts, generate answers in batches.

The one place for what chat (`eve.chat`), evaluation (`eve.eval`) and EVE re-captioning
(`data_curation.captions`) all need:

- `load_model(dir, device, dtype)`: (model, processor) from an `export/` directory, on CUDA in bf16
  when there is a GPU and on CPU in fp32 otherwise.
- `conversation_prompt(turns, template)`: the generation prompt of a multi-turn conversation (a
  single question is `EveProcessor.build_prompt`).
- `generate(model, processor, prompts, images)`: decoded answers to one left-padded batch.
- `generate_all(...)`: answers to many prompts in batches, in an order that groups similar lengths
  (`length_order`), images read one batch at a time; an image that fails to load costs its prompt
  (None), never the run.

Greedy by default; `temperature > 0` samples (with `top_p`), seeded by the caller's `torch.manual_seed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eve.image_processing_eve import load_image
from eve.templates import conversation_to_pieces

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
"""Names accepted for `dtype` (the `--dtype` choices of the CLIs)."""

# One image per prompt: None (text only), a PIL image, a file path, or a zero-argument callable that
# returns a PIL image (read lazily, so that only one batch of images is decoded at a time).
ImageSource = Image.Image | str | os.PathLike | Callable[[], Image.Image] | None


# ------------------------------------------------------------------------------------------ loading
def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str, dtype: str | None = None) -> torch.dtype:
    """`dtype` by name, else bf16 on CUDA (the training precision) and fp32 elsewhere (CPUs lack fast bf16)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return getattr(torch, dtype)
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> tuple:
    """(EveForCausalLM in eval mode, EveProcessor) from one exported directory (`save_pretrained` layout)."""
    from eve import EveForCausalLM, EveProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json, so not an exported checkpoint; pass the `export/` folder "
            "of a finished stage (e.g. runs/demo/sft/export)"
        )
    device = device or default_device()
    model = EveForCausalLM.from_pretrained(model_dir, dtype=inference_dtype(device, dtype))
    return model.to(device).eval(), EveProcessor.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------ prompts
def conversation_prompt(turns: list[dict[str, str]], template: str) -> str:
    """The generation prompt of LLaVA turns that end with a human turn (history + open assistant turn)."""
    pieces = conversation_to_pieces(turns, template, add_generation_prompt=True)
    return "".join(text for text, _ in pieces)


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """`model.generate` arguments: greedy at temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


# --------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def generate(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Image.Image | None],
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    **generate_kwargs,
) -> list[str]:
    """Decoded, stripped answers to one batch of ready-made prompts (left-padded; one image or None each)."""
    batch = processor(list(prompts), list(images), padding_side="left")
    batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.pad_token_id,
        **sampling_kwargs(temperature, top_p),
    )
    kwargs.update(generate_kwargs)
    out = model.generate(**batch, **kwargs)  # (B, T + new): the prompt, then new tokens (pad after eos)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _image_size(image: ImageSource) -> tuple[int, int] | None:
    """(height, width) of an image source without decoding pixels; None when unknown or unreadable."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:  # reads the header only
                return im.height, im.width
        except (OSError, ValueError):  # reported when the batch loads it
            return None
    return None


def length_order(prompts: Sequence[str], images: Sequence[ImageSource], image_processor) -> list[int]:
    """Prompt indices with similar lengths together: text-only first, then by image tokens, then text length.

    Batching in this order keeps left padding short. Image sizes come from file headers; an image of
    unknown size (a callable, or an unreadable file) sorts first among the image prompts.
    """

    def key(i: int) -> tuple[int, int, int]:
        if images[i] is None:
            return (0, 0, len(prompts[i]))
        size = _image_size(images[i])
        tokens = image_processor.num_image_tokens(*image_processor.grid_hw(*size)) if size else 0
        return (1, tokens, len(prompts[i]))

    return sorted(range(len(prompts)), key=key)


def _load(image: ImageSource) -> Image.Image | None:
    """The PIL image of an image source (None stays None)."""
    if image is None or isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    return image()


def generate_all(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[ImageSource],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    order: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "generate",
    **generate_kwargs,
) -> list[str | None]:
    """Answers to many prompts, in input order, generated `batch_size` at a time in `order` (default: as given).

    Images are loaded one batch at a time; one that fails (ImageLoadError and other ValueErrors, or
    OSError from reading) is logged with its message and its prompt's answer is None. Further keyword
    arguments (temperature, top_p, ...) go to `generate`.
    """
    from tqdm.auto import tqdm

    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images (use None for text-only)")
    order = list(range(len(prompts))) if order is None else list(order)
    if sorted(order) != list(range(len(prompts))):
        raise ValueError(f"order must be a permutation of range({len(prompts)})")
    answers: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        kept, loaded = [], []
        for i in order[start : start + batch_size]:
            try:
                loaded.append(_load(images[i]))
                kept.append(i)
            except (ValueError, OSError) as e:  # a bad image costs its prompt, never the run
                logger.warning(f"{desc}: no answer for prompt {i}: {e}")
        if kept:
            batch = generate(
                model, processor, [prompts[i] for i in kept], loaded, max_new_tokens, **generate_kwargs
            )
            for i, answer in zip(kept, batch):
                answers[i] = answer
        bar.update(len(order[start : start + batch_size]))
    bar.close()
    return answers
