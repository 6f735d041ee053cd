"""EveProcessor: tokenizer + the front-end's image processor + chat templates -> model inputs with masked labels.

Tokenization (one routine for training samples and generation prompts, so they agree token for token):
`<s>` first, then the text is cut at every `<image>` placeholder and every `</s>`; each text run is
encoded on its own (SentencePiece's dummy prefix "▁" at the start of each run), which is what the
official LLaVA/EVE `tokenizer_image_token` with Vicuna's legacy tokenizer produces; each `<image>`
becomes a run of `image_token_index` ids as long as the image processor says (PEL: 1 + h*(w+1); encoder
front-end: the connector's T) and each `</s>` the eos id. Labels come
from character offsets of the template's target pieces: a token is supervised iff its first character
is in a target piece. The answer's leading space is part of the target, so the first answer token is
"▁Yes", exactly what greedy decoding emits after a prompt ending in "ASSISTANT:"; tests check that the
generation prompt is a token prefix of the training sample and that the supervised tokens equal the
answer tokenized alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature

from eve.configuration_eve import IGNORE_INDEX
from eve.image_processing_encoders import (
    EncoderImageProcessor,
    image_processor_from_config,
    image_processor_from_pretrained,
)
from eve.image_processing_eve import EveImageProcessor, ImageInput, ImageLoadError
from eve.templates import IMAGE_PLACEHOLDER, ChatTemplate, conversation_to_pieces, get_template
from eve.templates import build_prompt as _build_prompt

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "processor_config.json"


class EveProcessor:
    """Tokenizer + image processor + chat templates (`eve.templates.TEMPLATES`) -> EveForCausalLM inputs."""

    def __init__(
        self,
        tokenizer,
        image_processor: EveImageProcessor | EncoderImageProcessor | None = None,
        image_token_index: int = -200,
        template: str = "vicuna_v1",
        answer_instruction: str | None = None,
    ) -> None:
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer needs bos and eos tokens (a Llama/Vicuna SentencePiece tokenizer)."
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor or EveImageProcessor()
        self.image_token_index = int(image_token_index)
        self.template = get_template(template).name
        self.answer_instruction = answer_instruction
        """Appended on its own line to a question by `instruct` (chat, `build_prompt`): the prompt form a
        model was fine-tuned with, saved with its export; None: questions go as they are."""
        # Text is cut at image placeholders and at the eos string (see the module docstring).
        self._split = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(tokenizer.eos_token)})")

    @classmethod
    def from_config(cls, tokenizer, config, template: str = "vicuna_v1") -> EveProcessor:
        """A processor matching an EveConfig (its front-end's image processor and image_token_index)."""
        return cls(tokenizer, image_processor_from_config(config), config.image_token_index, template)

    @property
    def pad_token_id(self) -> int:
        """Padding id (Vicuna: unk = 0)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.unk_token_id or 0

    # ----------------------------------------------------------------------------------------------
    # tokenization shared by training samples and generation prompts
    def _encode_pieces(
        self, pieces: list[tuple[str, bool]], image_runs: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """[(text, is_target)] -> (input_ids, labels), bos first, each <image> expanded to its run length."""
        text = "".join(piece for piece, _ in pieces)
        is_target = np.zeros(len(text) + 1, dtype=bool)  # per character; the extra slot guards offsets
        pos = 0
        for piece, target in pieces:
            is_target[pos : pos + len(piece)] = target
            pos += len(piece)

        # Alternating text runs and separators (<image> or </s>); text runs are tokenized in one batch.
        runs, seps, start = [], [], 0
        for match in self._split.finditer(text):
            runs.append((start, match.start()))
            seps.append((match.group(0), match.start()))
            start = match.end()
        runs.append((start, len(text)))
        encoded = self.tokenizer(
            [text[a:b] for a, b in runs], add_special_tokens=False, return_offsets_mapping=True
        )

        ids, labels = [self.tokenizer.bos_token_id], [IGNORE_INDEX]
        n_images = 0
        for k, (a, b) in enumerate(runs):
            for token, (tok_start, _) in zip(encoded["input_ids"][k], encoded["offset_mapping"][k]):
                ids.append(token)
                labels.append(token if is_target[a + min(tok_start, max(b - a - 1, 0))] else IGNORE_INDEX)
            if k == len(seps):
                break
            sep, where = seps[k]
            if sep == IMAGE_PLACEHOLDER:
                run = image_runs[n_images]
                n_images += 1
                ids.extend([self.image_token_index] * run)
                labels.extend([IGNORE_INDEX] * run)
            else:
                ids.append(self.tokenizer.eos_token_id)
                labels.append(self.tokenizer.eos_token_id if is_target[where] else IGNORE_INDEX)
        return ids, labels

    def _image_inputs(self, images: Sequence[ImageInput], sample: str) -> tuple[BatchFeature, list[int]]:
        """Preprocess images; returns the features and each image's token run length."""
        try:
            features = self.image_processor.preprocess(list(images))
        except ImageLoadError as err:  # the same class (e.g. ImageTooLargeError), now naming the sample
            raise type(err)(f"{sample}: {err}") from err
        runs = [self.image_processor.num_image_tokens(int(h), int(w)) for h, w in features["image_grid_hw"]]
        return features, runs

    # ----------------------------------------------------------------------------------------------
    # training samples
    def encode(
        self,
        conversations: list[dict[str, str]],
        image: ImageInput | None = None,
        template: str | ChatTemplate | None = None,
        max_length: int | None = None,
        sample_id: Any = None,
    ) -> dict[str, Any]:
        """One LLaVA sample -> {"input_ids", "labels" (lists), "pixel_values"?, "image_grid_hw"?, "truncated"?}.

        Labels are -100 except the template's targets. With max_length, the sample is cut to that many
        tokens and "truncated" reports whether it was; a cut never splits an image run: an image that does
        not fit is dropped whole (no pixel_values). ValueError (naming the sample) for a malformed sample.
        """
        sample = f"sample {sample_id}" if sample_id is not None else "sample"
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(f"{sample}: empty conversation; expected a list of {{'from', 'value'}} turns.")
        # Malformed turns (a non-string value, no 'from') are reported by conversation_to_pieces below.
        values = [turn.get("value") for turn in conversations if isinstance(turn, dict)]
        n_placeholders = sum(v.count(IMAGE_PLACEHOLDER) for v in values if isinstance(v, str))
        want = 0 if image is None else 1
        if n_placeholders != want:
            raise ValueError(
                f"{sample}: has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{'an image' if image is not None else 'no image'}; an image sample needs exactly one "
                f"{IMAGE_PLACEHOLDER} in a human turn and a text-only sample none."
            )
        pieces = conversation_to_pieces(conversations, template or self.template, sample=sample)
        features, runs = (None, []) if image is None else self._image_inputs([image], sample)
        ids, labels = self._encode_pieces(pieces, runs)

        out: dict[str, Any] = {"input_ids": ids, "labels": labels}
        keep_image = features is not None
        if max_length is not None:
            truncated = len(ids) > max_length
            if truncated:
                cut = max_length
                if keep_image:
                    first = ids.index(self.image_token_index)
                    if cut < first + runs[0]:  # the cut would fall inside (or before) the image run
                        cut, keep_image = first, False
                        logger.debug("%s: image dropped by truncation to %d tokens", sample, max_length)
                out["input_ids"], out["labels"] = ids[:cut], labels[:cut]
            out["truncated"] = truncated
        if keep_image:
            out["pixel_values"] = features["pixel_values"]
            out["image_grid_hw"] = features["image_grid_hw"]
        return out

    # ----------------------------------------------------------------------------------------------
    # generation
    def instruct(self, question: str) -> str:
        """`question` followed by the model's answer instruction on a new line (unless it already ends
        with it, or the model has none)."""
        if not self.answer_instruction or question.rstrip().endswith(self.answer_instruction):
            return question
        return f"{question}\n{self.answer_instruction}"

    def build_prompt(
        self,
        question: str,
        template: str | ChatTemplate | None = None,
        has_image: bool = True,
        instruct: bool = True,
    ) -> str:
        """The single-turn generation prompt for `question` (adds the <image> placeholder when has_image;
        with `instruct`, the model's answer instruction, if it has one)."""
        return _build_prompt(
            self.instruct(question) if instruct else question, template or self.template, has_image
        )

    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput | None] | None = None,
        template: str | ChatTemplate | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Prompts (or, with `template`, questions) + one image or None each -> a padded generation batch.

        Returns input_ids and attention_mask (B, T), and when any image is given pixel_values
        (P_total, 3*p*p) and image_grid_hw (n, 2) in prompt order. Prompts must hold one <image> per image.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
            images = [images] if images is not None and not isinstance(images, (list, tuple)) else images
        prompts = list(prompts)
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(images)} images (use None for text-only).")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if template is not None:
            prompts = [self.build_prompt(q, template, img is not None) for q, img in zip(prompts, images)]

        given = [img for img in images if img is not None]
        features, runs = self._image_inputs(given, "batch") if given else (None, [])
        rows, k = [], 0
        for i, (prompt, img) in enumerate(zip(prompts, images)):
            want = 0 if img is None else 1
            if prompt.count(IMAGE_PLACEHOLDER) != want:
                raise ValueError(
                    f"prompt {i}: has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) but "
                    f"{'an image' if want else 'no image'}; build it with build_prompt(question, template, has_image)."
                )
            ids, _ = self._encode_pieces([(prompt, False)], runs[k : k + want])
            k += want
            rows.append(ids)

        longest = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids, attention_mask = [], []
        for r in rows:
            fill = longest - len(r)
            if padding_side == "left":
                input_ids.append([pad] * fill + r)
                attention_mask.append([0] * fill + [1] * len(r))
            else:
                input_ids.append(r + [pad] * fill)
                attention_mask.append([1] * len(r) + [0] * fill)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors == "pt":
            data = {key: torch.tensor(value, dtype=torch.long) for key, value in data.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}.")
        if features is not None:
            data["pixel_values"] = features["pixel_values"]
            data["image_grid_hw"] = features["image_grid_hw"]
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """tokenizer.batch_decode."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """tokenizer.decode."""
        return self.tokenizer.decode(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer, preprocessor_config.json and processor_config.json into save_directory."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        config = {
            "processor_class": type(self).__name__,
            "image_token_index": self.image_token_index,
            "template": self.template,
        }
        if self.answer_instruction:
            config["answer_instruction"] = self.answer_instruction
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> EveProcessor:
        """Load what save_pretrained wrote (offline); keyword overrides replace processor_config fields."""
        from eve.assets import load_tokenizer

        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"Processor directory {path} does not exist.")
        config_file = path / PROCESSOR_CONFIG_NAME
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        config.pop("processor_class", None)
        config.update(overrides)
        if (path / "preprocessor_config.json").exists():
            image_processor = image_processor_from_pretrained(path)
        elif (
            path / "config.json"
        ).exists():  # a model export without processor files: derive from its config
            from eve.configuration_eve import EveConfig

            model_config = EveConfig.from_pretrained(str(path))
            image_processor = image_processor_from_config(model_config)
            config.setdefault("image_token_index", model_config.image_token_index)
        else:
            raise FileNotFoundError(
                f"{path} has neither preprocessor_config.json nor config.json; save it with EveProcessor.save_pretrained."
            )
        return cls(load_tokenizer(path), image_processor, **config)
