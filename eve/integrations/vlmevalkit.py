"""VLMEvalKit model `EveVLM`: an exported EVE checkpoint in VLMEvalKit (open-compass/VLMEvalKit).

VLMEvalKit is installed from its git checkout (it is not on PyPI). A model there is a class with
`generate_inner(message, dataset)`, where `message` is a list of `{"type": "text" | "image", "value"}`
(an image's value is a file path), listed by name in `vlmeval.config.supported_VLM`. `EveVLM`
subclasses `vlmeval.vlm.base.BaseModel` when vlmeval is importable and otherwise stands alone with
the same methods (`generate`, `generate_inner`, `use_custom_prompt`), so it runs and is tested
without VLMEvalKit. `register(name, model_path)` adds an entry to `supported_VLM` in-process, e.g.
in a two-line launcher before VLMEvalKit's `run.py` (see docs/evaluation.md).

The question is the message's texts joined by newlines (VLMEvalKit's dataset prompt, format line
included); EVE sees one image per prompt, so a message with several is answered about the first
(as VLMEvalKit does for every model without interleaved input).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from eve.image_processing_eve import load_image
from eve.integrations.harness import EveHarnessModel

logger = logging.getLogger(__name__)

try:
    from vlmeval.vlm.base import BaseModel
except ImportError:  # VLMEvalKit not installed: the same interface, standalone

    class BaseModel:
        """The part of VLMEvalKit's `BaseModel` that its runner calls."""

        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def use_custom_prompt(self, dataset: str | None) -> bool:
            """Whether the model builds its own prompt for `dataset` (no: VLMEvalKit's prompts are used)."""
            return False

        def generate(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
            """The answer to one message (a list of {"type", "value"} items)."""
            for item in message:
                if item["type"] not in self.allowed_types:
                    raise ValueError(f"message item of type {item['type']!r}; allowed: {self.allowed_types}")
            return self.generate_inner(message, dataset)


class EveVLM(BaseModel):
    """An EVE export answering VLMEvalKit messages: greedy, one message at a time."""

    INTERLEAVE = False

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 512,
        template: str | None = None,
        answer_instruction: bool = False,
        model_and_processor: tuple | None = None,
    ) -> None:
        if model_and_processor is not None:  # an already loaded (model, processor), e.g. in tests
            self.eve = EveHarnessModel(*model_and_processor, template, answer_instruction)
        elif model_path is not None:
            self.eve = EveHarnessModel.from_export(
                model_path, device, dtype, template=template, answer_instruction=answer_instruction
            )
        else:
            raise ValueError("EveVLM needs model_path (an EVE export directory, e.g. runs/demo/sft/export)")
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        """The answer to one message: its texts joined by newlines, about its first image (if any)."""
        question = "\n".join(item["value"] for item in message if item["type"] == "text")
        paths = [item["value"] for item in message if item["type"] == "image"]
        if len(paths) > 1:
            logger.warning(
                f"EveVLM: a {dataset or ''} message has {len(paths)} images; answering about the first"
            )
        image = load_image(paths[0]) if paths else None
        [answer] = self.eve.answer([question], [image], self.max_new_tokens)
        return answer


def register(name: str, model_path: str | os.PathLike, **kwargs: Any) -> None:
    """Make `name` a VLMEvalKit model (`run.py --model NAME`) for this process: an `EveVLM` of `model_path`."""
    from functools import partial

    from vlmeval.config import supported_VLM

    supported_VLM[name] = partial(EveVLM, model_path=model_path, **kwargs)
