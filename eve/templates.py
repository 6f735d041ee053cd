"""Chat templates as data: the `plain` (pre-training) and `vicuna_v1` (SFT) layouts of LLaVA/EVE, `qwen2` of EVEv2.

A template turns a LLaVA conversation `[{"from": "human"|"gpt", "value": ...}, ...]` into text pieces
`(text, is_target)`; the processor tokenizes them and supervises only the target pieces. The layouts
follow the official EVE/LLaVA code (`conv_vicuna_v1`, `conv_eve_plain`, `preprocess_v1`,
`preprocess_plain`, `preprocess_multimodal`):

- vicuna_v1: `"{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"`; the
  targets are `" {a}</s>"` (the space before the answer belongs to its first token, "▁Yes", exactly
  the token that greedy decoding produces after a prompt ending in "ASSISTANT:").
- qwen2: EVEv2's SFT layout (its `conv_qwen_v2`): vicuna_v1's system text and turns, each answer
  closed by Qwen2's `<|im_end|>` instead of `</s>`.
- plain: `"<image>{caption}\\n"`; the human text is dropped (as the official code does) and the
  target is `"{caption}\\n"`. Its generation prompt is `"<image>"` (the official `get_prompt` would
  append a "\\n" that training never saw).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ChatTemplate:
    """The text layout of one chat format; every field is a literal string placed around the turns."""

    name: str
    """Key in TEMPLATES."""
    system: str
    """Text before the first turn (never supervised)."""
    system_sep: str
    """Separator after the system text (only when the system text is non-empty)."""
    user_prefix: str
    """Text before each human message, e.g. "USER: "."""
    user_suffix: str
    """Text after each human message, e.g. " "."""
    assistant_prefix: str
    """Text that opens an assistant turn and ends a generation prompt, e.g. "ASSISTANT:"."""
    answer_prefix: str
    """Supervised text before the answer, e.g. " " (merges into the answer's first token)."""
    answer_suffix: str
    """Supervised text after the answer: "</s>" (the eos) for vicuna_v1, "\\n" for plain."""
    image_sep: str
    """Text between the image placeholder (moved to the start of its turn) and the human text."""
    keep_user_text: bool
    """False for plain: a human turn contributes only its image placeholder."""
    max_turn_pairs: int | None = None
    """Most human/gpt pairs a training sample may have (plain: exactly one); None = any number."""


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(
        name="plain",
        system="",
        system_sep="",
        user_prefix="",
        user_suffix="",
        assistant_prefix="",
        answer_prefix="",
        answer_suffix="\n",
        image_sep="",
        keep_user_text=False,
        max_turn_pairs=1,
    ),
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        system=VICUNA_SYSTEM,
        system_sep=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        answer_prefix=" ",
        answer_suffix="</s>",
        image_sep="\n",
        keep_user_text=True,
    ),
}
# EVEv2's layout is Vicuna's with Qwen2's end-of-turn token closing each answer.
TEMPLATES["qwen2"] = dataclasses.replace(TEMPLATES["vicuna_v1"], name="qwen2", answer_suffix="<|im_end|>")


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template called `name` (a ChatTemplate passes through); ValueError lists the known names."""
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}.")
    return TEMPLATES[name]


def _human_text(value: str, template: ChatTemplate) -> str:
    """A human message as the template shows it: the image placeholder moved to the front, as officially."""
    has_image = IMAGE_PLACEHOLDER in value
    text = value.replace(IMAGE_PLACEHOLDER, "").strip() if has_image else value
    if not template.keep_user_text:
        text = ""
    if has_image:
        return IMAGE_PLACEHOLDER + template.image_sep + text if text else IMAGE_PLACEHOLDER
    return text


def conversation_to_pieces(
    conversations: list[dict[str, str]],
    template: str | ChatTemplate,
    add_generation_prompt: bool = False,
    sample: str = "sample",
) -> list[tuple[str, bool]]:
    """LLaVA turns -> [(text, is_target)]; with add_generation_prompt the last turn is human and the text ends open."""
    tpl = get_template(template)
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"{sample}: empty conversation; expected a list of {{'from', 'value'}} turns.")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{sample}: turn {i} must be a dict with 'from' and a string 'value', got {turn!r}."
            )
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ValueError(
                f"{sample}: turn {i} is from {turn['from']!r}, expected {expected!r} "
                "(turns must alternate human, gpt, human, ... starting with human)."
            )
        if turn["from"] == GPT and IMAGE_PLACEHOLDER in turn["value"]:
            raise ValueError(
                f"{sample}: turn {i} (gpt) contains {IMAGE_PLACEHOLDER}; images go in human turns."
            )
    ends_with_human = len(conversations) % 2 == 1
    if ends_with_human and not add_generation_prompt:
        raise ValueError(
            f"{sample}: the conversation ends with a human turn; a training sample must end with gpt."
        )
    if not ends_with_human and add_generation_prompt:
        raise ValueError(f"{sample}: a generation prompt must end with a human turn.")
    n_pairs = (len(conversations) + 1) // 2
    if tpl.max_turn_pairs is not None and n_pairs > tpl.max_turn_pairs:
        raise ValueError(
            f"{sample}: template {tpl.name!r} takes at most {tpl.max_turn_pairs} human/gpt pair(s), got {n_pairs}."
        )

    pieces: list[tuple[str, bool]] = []
    prompt = tpl.system + tpl.system_sep if tpl.system else ""
    for i in range(0, len(conversations), 2):
        prompt += tpl.user_prefix + _human_text(conversations[i]["value"], tpl) + tpl.user_suffix
        prompt += tpl.assistant_prefix
        if i + 1 < len(conversations):
            pieces.append((prompt, False))
            pieces.append((tpl.answer_prefix + conversations[i + 1]["value"] + tpl.answer_suffix, True))
            prompt = ""
    if prompt:
        pieces.append((prompt, False))
    return [(text, target) for text, target in pieces if text]


def build_prompt(question: str, template: str | ChatTemplate = "vicuna_v1", has_image: bool = True) -> str:
    """The single-turn generation prompt for `question`; an <image> placeholder is added when has_image."""
    value = question
    if has_image and IMAGE_PLACEHOLDER not in question:
        value = IMAGE_PLACEHOLDER + "\n" + question
    pieces = conversation_to_pieces([{"from": HUMAN, "value": value}], template, add_generation_prompt=True)
    return "".join(text for text, _ in pieces)
