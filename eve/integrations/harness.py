"""What an evaluation harness needs from an exported EVE: prompts, answers cut at stop strings, log-likelihoods.

Harnesses hand over a question that already carries the benchmark's answer-format line (lmms-eval's
`post_prompt`, VLMEvalKit's dataset prompt), the way `eve.eval` builds its questions; the model's own
answer instruction (`EveProcessor.instruct`, what `eve.chat` adds) is added only with
`answer_instruction=True`. The model sees one image per prompt, placed before the question.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch
from PIL import Image

from eve.inference import generate, load_model
from eve.templates import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

# A placeholder written into a harness's question, with the newline that usually follows it.
_PLACEHOLDER = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"\n?")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty stop string, stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


class EveHarnessModel:
    """An exported EVE with the calls evaluation harnesses make: `prompt`, `answer`, `loglikelihood`."""

    def __init__(self, model, processor, template: str | None = None, answer_instruction: bool = False):
        self.model, self.processor = model, processor
        self.template = template or processor.template
        self.answer_instruction = answer_instruction
        """Append the export's answer instruction to each question (as `eve.chat` does); off by
        default because the harness's question already ends with its benchmark's format line."""

    @classmethod
    def from_export(
        cls, model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None, **kwargs
    ) -> EveHarnessModel:
        """Load an `export/` directory with `eve.inference.load_model` (bf16 on CUDA, fp32 on CPU by default)."""
        model, processor = load_model(model_dir, device, dtype)
        return cls(model, processor, **kwargs)

    def prompt(self, question: str, has_image: bool) -> str:
        """The generation prompt for a harness's question: placeholders it wrote are dropped and, with an
        image, one is put before the question (where EVE was trained to see it)."""
        question = _PLACEHOLDER.sub("", question)
        if self.answer_instruction:
            question = self.processor.instruct(question)
        return self.processor.build_prompt(question, self.template, has_image, instruct=False)

    def answer(
        self,
        questions: Sequence[str],
        images: Sequence[Image.Image | None],
        max_new_tokens: int = 128,
        until: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answers to one batch of questions (one PIL image or None each), cut before the first stop string.

        Generation also halts at a stop string (transformers' `stop_strings`), so a long answer costs
        no more than its kept part; the cut is what defines the result.
        """
        prompts = [self.prompt(q, im is not None) for q, im in zip(questions, images)]
        stops = [s for s in until if s]
        extra = {"stop_strings": stops, "tokenizer": self.processor.tokenizer} if stops else {}
        answers = generate(
            self.model,
            self.processor,
            prompts,
            list(images),
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            **extra,
        )
        return [cut_at_stops(a, stops) for a in answers]

    def loglikelihood(
        self,
        questions: Sequence[str],
        continuations: Sequence[str],
        images: Sequence[Image.Image | None],
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | prompt), is it the greedy continuation) for one batch; see `continuation_logprobs`."""
        prompts = [self.prompt(q, im is not None) for q, im in zip(questions, images)]
        return continuation_logprobs(self.model, self.processor, prompts, continuations, images)


@torch.inference_mode()
def continuation_logprobs(
    model,
    processor,
    prompts: Sequence[str],
    continuations: Sequence[str],
    images: Sequence[Image.Image | None],
) -> list[tuple[float, bool]]:
    """Sum of log-probabilities of each continuation's tokens after its prompt, and whether greedy decoding
    would emit exactly those tokens; one forward pass over the right-padded batch.

    The continuation's tokens are those of `prompt + continuation` after the first len(tokens(prompt))
    (the lm-evaluation-harness convention), so a continuation " Yes" after "ASSISTANT:" is scored as
    the "▁Yes" that generation emits. No eos is appended.
    """
    full = processor([p + c for p, c in zip(prompts, continuations)], list(images), padding_side="right")
    n_prompt = processor(list(prompts), list(images), padding_side="right")["attention_mask"].sum(1)  # (B,)
    n_full = full["attention_mask"].sum(1)  # (B,)
    ids = full["input_ids"]  # (B, T), right-padded, so positions are those of each row alone
    # Token t is predicted at position t - 1: only rows [min prompt - 1, max full - 1) need logits.
    lo, hi = int(n_prompt.min()) - 1, int(n_full.max()) - 1
    if hi <= lo:  # every continuation is empty
        return [(0.0, True)] * len(prompts)
    batch = {k: v.to(model.device) for k, v in full.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    keep = torch.arange(lo, hi, device=model.device)
    logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (B, hi - lo, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    results = []
    for b in range(len(prompts)):
        targets = ids[b, int(n_prompt[b]) : int(n_full[b])]  # (n,) the continuation's tokens
        rows = logprobs[b, int(n_prompt[b]) - 1 - lo : int(n_full[b]) - 1 - lo]  # (n, V) their predictions
        total = rows.gather(1, targets[:, None]).sum().item()
        results.append((total, bool((rows.argmax(-1) == targets).all())))
    return results
