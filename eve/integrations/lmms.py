"""lmms-eval model `eve`: an exported EVE checkpoint in lmms-eval (tested with lmms-eval 0.7.3).

    pip install -c requirements/pins.txt -e ".[eval]"
    lmms-eval --model eve --model_args pretrained=runs/demo/sft/export --tasks pope,mme --batch_size 8

lmms-eval 0.7 finds models outside its tree through the Python entry-point group `lmms_eval.models`
(a `ModelManifest` naming the class); this package declares `eve = eve.integrations.lmms:manifest`
there, so the command works once the package is installed. Without reinstalling,
`python -m eve.integrations.lmms ARGS` registers the model in-process and runs lmms-eval's CLI
with the same arguments. `@register_model("eve")` also fills the older decorator registry.

Model args (`--model_args k=v,...`): `pretrained` (the export), `device`, `dtype` (float32, bfloat16,
float16), `template`, `answer_instruction` (true: also append the export's own instruction). Requests
are answered `--batch_size` at a time: greedy at `temperature` 0, cut before the first `until`
string, at most `max_new_tokens`. EVE sees one image per prompt: a document with several images is
answered about its first (counted and logged).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        f"eve.integrations.lmms needs lmms-eval ({err}); install it with "
        "`pip install -c requirements/pins.txt -e '.[eval]'`"
    ) from err
try:
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # lmms-eval < 0.7 keeps model outputs as they are
    GenerationResult = None

from eve.image_processing_eve import load_image
from eve.inference import DTYPES, default_device
from eve.integrations.harness import EveHarnessModel

logger = logging.getLogger(__name__)

MODEL_NAME = "eve"
"""The name lmms-eval knows the model by (`--model eve`)."""

DEFAULT_MAX_NEW_TOKENS = 128
"""Answer length when a task's generation_kwargs give none (lmms-eval's own default is 1024)."""


def manifest():
    """The `lmms_eval.models` entry point: where lmms-eval (>= 0.7) finds the `eve` model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="eve.integrations.lmms.EveLmms")


@register_model(MODEL_NAME)
class EveLmms(lmms):
    """lmms-eval's `generate_until`, `loglikelihood` and `generate_until_multi_round` for an EVE export."""

    is_simple = True  # takes the task's text context (not chat messages)

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # only for --batch_size auto, which is not supported
        template: str | None = None,
        answer_instruction: bool = False,
        model_and_processor: tuple | None = None,
    ) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported for eve; pass a number, e.g. --batch_size 8")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.batch_size = int(batch_size)
        if model_and_processor is None:
            self.eve = EveHarnessModel.from_export(
                pretrained, _device(device), dtype, template=template, answer_instruction=answer_instruction
            )
        else:  # an already loaded (model, processor), e.g. in tests
            self.eve = EveHarnessModel(*model_and_processor, template, answer_instruction)
        self.n_extra_images = 0
        """Documents that gave more than one image (EVE answered about the first)."""

    @property
    def model(self):
        """The EveForCausalLM (lmms-eval's `clean()` releases it)."""
        return self.eve.model

    @property
    def device(self):
        """The model's device (the evaluator gathers results there across ranks)."""
        return self.eve.model.device

    # ------------------------------------------------------------------------------------------ inputs
    def _image(
        self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int
    ) -> Image.Image | None:
        """The first image a document shows (None for a text-only one)."""
        if doc_to_visual is None:
            return None
        return self._first_image(doc_to_visual(self.task_dict[task][split][doc_id]), f"{task} doc {doc_id}")

    def _first_image(self, visuals: list | None, where: str) -> Image.Image | None:
        """The first of a document's visuals as a PIL image (a path is read as an image file); None if none."""
        visuals = [v for v in visuals or [] if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            self.n_extra_images += 1
        first = visuals[0]
        if isinstance(first, Image.Image):
            return first
        if isinstance(first, (str, os.PathLike)):
            return load_image(first)
        raise ValueError(f"{where}: visual of type {type(first).__name__}; EVE reads images only")

    def _report_extra_images(self) -> None:
        """Log how many documents had more images than EVE looks at."""
        if self.n_extra_images:
            logger.warning(
                f"eve: {self.n_extra_images} documents had several images; answered about the first"
            )
            self.n_extra_images = 0

    def _batches(self, n: int, desc: str):
        """Start indices of `batch_size` chunks of `n` requests, with a progress bar on rank 0."""
        return tqdm(range(0, n, self.batch_size), desc=desc, disable=self.rank != 0, leave=False)

    # -------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to (context, generation_kwargs, doc_to_visual, doc_id, task, split) requests, in order.

        Requests are grouped by generation kwargs and batched longest context first; an image that cannot
        be read costs its request (answer "", logged), never the run.
        """
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            gen = _generation_options(requests[indices[0]].args[1])
            for start in self._batches(len(indices), "eve generate"):
                kept, questions, images = [], [], []
                for i in indices[start : start + self.batch_size]:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    try:
                        images.append(self._image(doc_to_visual, task, split, doc_id))
                    except (ValueError, OSError) as e:  # a bad image costs its request, never the run
                        logger.warning(f"eve: no answer for {task} doc {doc_id}: {e}")
                        continue
                    kept.append(i)
                    questions.append(context)
                if kept:
                    for i, answer in zip(kept, self.eve.answer(questions, images, **gen)):
                        answers[i] = answer
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], answer)
        self._report_extra_images()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """One list of answers per (context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task,
        split) request: round k's context and image come from `doc_to_text(doc, previous_output=answers,
        round_idx=k, previous_round_info=...)`, until it signals the end."""
        results = []
        for request in tqdm(requests, desc="eve multi-round", disable=self.rank != 0, leave=False):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            gen = _generation_options(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            image = self._image(doc_to_visual, task, split, doc_id)
            rounds: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, done, rounds, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=round_idx, previous_round_info=info
                    )
                    rounds = list(rounds)
                    if done:
                        break
                    image = self._first_image(visuals, f"{task} doc {doc_id} round {round_idx}")
                [answer] = self.eve.answer([context], [image], **gen)
                rounds.append(answer)
                round_idx += 1
            results.append(rounds)
        self._report_extra_images()
        return results

    # -------------------------------------------------------------------------------- log-likelihood
    def loglikelihood(self, requests: list[Instance]) -> list:
        """(log p(continuation | context), is greedy) for (context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split) requests; a multiple-choice question's options share a batch.

        Each pair is wrapped in a `GenerationResult` on lmms-eval 0.7, whose evaluator turns any other
        non-string response into its str() (and multiple_choice then cannot unpack "(-3.2, False)");
        `unwrap_generation_output` hands the pair back unchanged.
        """
        questions, continuations, sources = [], [], []
        for request in requests:
            if len(request.args) == 2:  # ("", choice): the unconditional requests of acc_mutual_info
                (context, continuation), source = request.args, None
            else:
                context, target, doc_to_visual, doc_id, task, split = request.args
                if callable(target):
                    target = target(self.task_dict[task][split][doc_id])
                continuation, source = str(target), (doc_to_visual, task, split, doc_id)
            questions.append(context)
            continuations.append(continuation)
            sources.append(source)
        # The options of one question next to each other: one image, one context length per batch.
        order = sorted(range(len(requests)), key=lambda i: (str(sources[i][1:]) if sources[i] else "", i))
        results: list = [None] * len(requests)
        for start in self._batches(len(order), "eve loglikelihood"):
            batch = order[start : start + self.batch_size]
            images = [self._image(*sources[i]) if sources[i] else None for i in batch]
            scores = self.eve.loglikelihood(
                [questions[i] for i in batch], [continuations[i] for i in batch], images
            )
            for i, score in zip(batch, scores):
                results[i] = score if GenerationResult is None else GenerationResult(text=score)
                self.cache_hook.add_partial("loglikelihood", (questions[i], continuations[i]), score)
        self._report_extra_images()
        return results


def _device(device: str | None) -> str:
    """`device` as given; by default the process's own GPU under a multi-process launch, else cuda or cpu."""
    if device is not None:
        return device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and default_device() == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return default_device()


def _generation_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`EveHarnessModel.answer` options from a task's generation_kwargs (greedy unless temperature > 0
    with do_sample not false; num_beams and other keys are ignored)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "until": until,
        "temperature": temperature,
        "top_p": float(gen_kwargs.get("top_p") or 1.0),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m eve.integrations.lmms ARGS`: lmms-eval's CLI with the `eve` model registered in-process."""
    import lmms_eval.models
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    lmms_eval.models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    lmms_eval.models.AVAILABLE_MODELS[MODEL_NAME] = EveLmms.__name__
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    main()
