"""eve.integrations: the lmms-eval and VLMEvalKit adapters against eve.inference and plain forward passes."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from eve import inference
from eve.integrations.harness import EveHarnessModel
from eve.integrations.vlmevalkit import EveVLM
from tests.conftest import direct_answer, force_reply

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (pip install -e '.[eval]')")
from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402

from eve.integrations.lmms import EveLmms  # noqa: E402

TASK, SPLIT = "toy", "test"

# Three documents of different lengths: a tall image, text only, a wide image (different image runs).
DOCS = [
    {
        "image": Image.new("RGB", (16, 32), (200, 30, 30)),
        "question": "What colour is the shape in this picture?",
    },
    {"image": None, "question": "Say something about a long and winding road in the hills."},
    {"image": Image.new("RGB", (40, 8), (30, 30, 200)), "question": "Shape?"},
]


def doc_to_visual(doc):
    """lmms-eval's doc_to_visual: a list of PIL images ([] for text only)."""
    return [] if doc["image"] is None else [doc["image"]]


def generation_requests(docs, **gen_kwargs):
    """generate_until Instances, as lmms-eval builds them (each with its own copy of the kwargs)."""
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), doc_to_visual, i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def loglikelihood_requests(docs, continuations):
    """loglikelihood Instances: the continuation as a string, or as doc_to_target (a callable)."""
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], cont, doc_to_visual, i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, (doc, cont) in enumerate(zip(docs, continuations))
    ]


def scores(responses):
    """The (log-likelihood, is greedy) pairs lmms-eval's evaluator stores from loglikelihood responses."""
    return [unwrap_generation_output(r)[0] for r in responses]


def harness_model(model_and_processor, batch_size=3, docs=DOCS):
    """An EveLmms over an already loaded model, with the toy task's documents."""
    lm = EveLmms(pretrained="unused", batch_size=batch_size, model_and_processor=model_and_processor)
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def reference_prompts(processor, docs):
    """The prompts eve.eval would build for the documents' questions (no extra instruction)."""
    return [
        processor.build_prompt(d["question"], has_image=d["image"] is not None, instruct=False) for d in docs
    ]


def test_lmms_loads_export_through_lmms_eval_arguments(tiny_checkpoint):
    """`--model_args pretrained=...` plus the CLI's batch_size reach the project's loader."""
    lm = EveLmms.create_from_arg_string(f"pretrained={tiny_checkpoint},device=cpu", {"batch_size": "4"})
    assert lm.batch_size == 4 and lm.device.type == "cpu" and not lm.model.training
    with pytest.raises(ValueError, match="auto"):
        EveLmms.create_from_arg_string(f"pretrained={tiny_checkpoint}", {"batch_size": "auto"})


def test_generate_until_batched_equals_one_by_one_and_inference(loaded):
    """Three requests in one batch == each alone == eve.inference.generate == model.generate alone."""
    model, processor = loaded
    lm = harness_model(loaded, batch_size=3)
    kwargs = dict(max_new_tokens=5, temperature=0, do_sample=False, until=["\n\n"])
    batched = lm.generate_until(generation_requests(DOCS, **kwargs))
    alone = [lm.generate_until([r])[0] for r in generation_requests(DOCS, **kwargs)]
    prompts, images = reference_prompts(processor, DOCS), [d["image"] for d in DOCS]
    via_inference = inference.generate(model, processor, prompts, images, max_new_tokens=5)
    reference = [direct_answer(model, processor, p, im, max_new_tokens=5) for p, im in zip(prompts, images)]
    assert batched == alone == via_inference == reference
    assert all(reference)  # non-empty answers, so equality compares something


def test_until_cuts_answers_at_the_first_stop_string(loaded):
    """An answer stops before the first `until` string; answers without it are unchanged."""
    lm = harness_model(loaded, batch_size=3)
    full = lm.generate_until(generation_requests(DOCS, max_new_tokens=8))
    words = full[0].split()
    assert len(words) >= 3, full  # enough words to cut in the middle
    stop = " " + words[1]
    cut = lm.generate_until(generation_requests(DOCS, max_new_tokens=8, until=[stop, ""]))
    assert cut == [answer.split(stop)[0].strip() for answer in full]
    assert cut[0] == words[0]


def hand_loglikelihood(model, processor, prompt, continuation, image):
    """Sum of log-softmax over the continuation's tokens from one unpadded forward pass, and greediness."""
    full = processor([prompt + continuation], [image])
    n_prompt = processor([prompt], [image])["input_ids"].shape[1]
    ids = full["input_ids"][0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**full).logits[0].float(), dim=-1)  # (T, V)
    total, greedy = 0.0, True
    for t in range(n_prompt, len(ids)):  # token t is predicted at position t - 1
        total += logprobs[t - 1, ids[t]].item()
        greedy &= bool(logprobs[t - 1].argmax() == ids[t])
    return total, greedy


def test_loglikelihood_equals_hand_computed_sum(loaded):
    """Batched, right-padded log-likelihoods == per-request sums from a plain forward pass."""
    model, processor = loaded
    lm = harness_model(loaded, batch_size=3)
    docs = [dict(d, answer="Red") for d in DOCS]
    lm.task_dict = {TASK: {SPLIT: docs}}
    continuations = [lambda doc: " " + doc["answer"], " yes and no", "A"]  # doc_to_target, then strings
    got = scores(lm.loglikelihood(loglikelihood_requests(docs, continuations)))
    prompts, images = reference_prompts(processor, docs), [d["image"] for d in docs]
    for (logprob, greedy), prompt, cont, image in zip(got, prompts, [" Red", " yes and no", "A"], images):
        want_logprob, want_greedy = hand_loglikelihood(model, processor, prompt, cont, image)
        # fp32 sums of 1-3 log-probs of about -10: padding changes matmul shapes, so the last bits differ.
        assert logprob == pytest.approx(want_logprob, abs=1e-4)
        assert greedy == want_greedy
        assert logprob < 0
    # The unconditional ("", choice) requests of acc_mutual_info: text only, empty question.
    [(logprob, _)] = scores(
        lm.loglikelihood(
            [Instance("loglikelihood", ("", " yes"), 0, {"task": TASK, "doc_id": 0, "repeats": 1})]
        )
    )
    want, _ = hand_loglikelihood(model, processor, processor.build_prompt("", has_image=False), " yes", None)
    assert logprob == pytest.approx(want, abs=1e-4)


def test_loglikelihood_greedy_flag(loaded, tokenizer):
    """A model rigged to answer "no": " no" is its greedy continuation, " yes" and " no no" are not."""
    model, processor = loaded
    [no] = tokenizer("no", add_special_tokens=False)["input_ids"]
    rigged = force_reply(copy.deepcopy(model), no, tokenizer.eos_token_id)
    lm = harness_model((rigged, processor), batch_size=2)
    docs = [DOCS[0], DOCS[0], DOCS[2]]
    lm.task_dict = {TASK: {SPLIT: docs}}
    got = scores(lm.loglikelihood(loglikelihood_requests(docs, [" no", " yes", " no no"])))
    assert [greedy for _, greedy in got] == [True, False, False]
    assert got[0][0] > got[1][0]  # the greedy token is the likelier one


def test_generate_until_multi_round(loaded):
    """Each round's context comes from doc_to_text; its answer equals a single-round request's."""
    lm = harness_model(loaded)
    follow_up = "And what about the background?"

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        done = round_idx >= 2
        return doc_to_visual(doc), follow_up, done, previous_output, {"seen": len(previous_output)}

    kwargs = dict(max_new_tokens=4, temperature=0)
    request = Instance(
        "generate_until_multi_round",
        (DOCS[0]["question"], dict(kwargs), doc_to_visual, doc_to_text, 0, TASK, SPLIT),
        0,
        {"task": TASK, "doc_id": 0, "repeats": 1},
    )
    [rounds] = lm.generate_until_multi_round([request])
    follow_doc = [dict(DOCS[0], question=follow_up)]
    lm_follow = harness_model(loaded, docs=follow_doc)
    assert rounds == [
        lm.generate_until(generation_requests(DOCS[:1], **kwargs))[0],
        lm_follow.generate_until(generation_requests(follow_doc, **kwargs))[0],
    ]


def test_vlmevalkit_answer_equals_lmms_answer(loaded, tmp_path):
    """VLMEvalKit's message (image path + question) gets the lmms-eval adapter's answer for that image."""
    path = tmp_path / "shape.png"
    DOCS[0]["image"].save(path)
    vlm = EveVLM(model_and_processor=loaded, max_new_tokens=5)
    lm = harness_model(loaded)
    lm.task_dict = {TASK: {SPLIT: [{"image": Image.open(path), "question": DOCS[0]["question"]}, DOCS[1]]}}
    want = lm.generate_until(generation_requests(lm.task_dict[TASK][SPLIT], max_new_tokens=5))
    image_message = [{"type": "image", "value": str(path)}, {"type": "text", "value": DOCS[0]["question"]}]
    text_message = [{"type": "text", "value": DOCS[1]["question"]}]
    assert [vlm.generate(image_message, "MME"), vlm.generate_inner(text_message, "MME")] == want
    assert vlm.use_custom_prompt("MME") is False


def test_lmms_eval_finds_the_model():
    """The entry-point manifest resolves, through lmms-eval's registry, to EveLmms (a simple lmms model)."""
    from lmms_eval.api.registry import MODEL_REGISTRY
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from eve.integrations.lmms import manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("eve") is EveLmms
    assert MODEL_REGISTRY["eve"] is EveLmms


def test_prompt_moves_placeholders_and_adds_the_instruction_on_request(loaded):
    """A harness's own <image> goes; the image sits before the question; the export's instruction is opt-in."""
    model, processor = loaded
    plain = EveHarnessModel(model, processor)
    assert plain.prompt("<image>\nIs it red?", True) == processor.build_prompt("Is it red?", instruct=False)
    instructed = EveHarnessModel(model, copy.copy(processor), answer_instruction=True)
    instructed.processor.answer_instruction = "Answer with one word."
    assert instructed.prompt("Is it red?", False).count("Is it red?\nAnswer with one word.") == 1


def write_local_task(root, docs) -> None:
    """A generate_until task `eve_local` on a local JSON file (no hub): image path, question, answer."""
    data = root / "test.json"
    data.write_text(json.dumps(docs))
    # lmms-eval's task YAML: `doc_to_visual: image` names the column ([doc["image"]], here a file path);
    # exact_match is lmms-eval's own (no hub download), the mean of answer == target, string for string.
    task = {
        "task": "eve_local",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "image",
        "doc_to_text": "question",
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 3, "temperature": 0, "until": ["\n"]},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (root / "tasks").mkdir()
    (root / "tasks" / "eve_local.yaml").write_text(json.dumps(task))  # JSON is YAML


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_local_task_as_the_adapter_answers(loaded, tiny_checkpoint, tmp_path):
    """`python -m lmms_eval --model eve` on 4 image questions from local files: its exact_match is the
    hand-scored mean of the adapter's own generate_until answers against the targets."""
    pytest.importorskip(
        "lmms_eval.evaluator", reason="lmms-eval's CLI imports are not installed (make install)"
    )
    from tests.train.synthetic import draw

    docs = []
    for i in range(4):
        image, caption = draw(i)
        image.save(tmp_path / f"{i}.png")
        question = ["What colour is the shape?", "What shape is it?"][i % 2]
        docs.append({"image": str(tmp_path / f"{i}.png"), "question": question, "answer": caption.split()[1]})
    kwargs = dict(max_new_tokens=3, temperature=0, until=["\n"])  # the task's generation_kwargs
    answers = harness_model(loaded, batch_size=2, docs=docs).generate_until(
        generation_requests(docs, **kwargs)
    )
    # The random model answers nonsense: two targets are its own answers, two the true colours.
    for doc, answer in zip(docs[:2], answers):
        doc["answer"] = answer
    want = sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    assert want == 0.5  # both outcomes occur, so the metric has something to get wrong
    write_local_task(tmp_path, docs)

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.update(HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # nothing from the network
    model_args = f"pretrained={tiny_checkpoint},device=cpu"
    args = ["--model", "eve", "--model_args", model_args, "--tasks", "eve_local", "--batch_size", "2"]
    args += ["--include_path", str(tmp_path / "tasks"), "--output_path", str(out)]
    args += ["--log_samples"]  # each document's answer, next to the aggregate
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [results_file] = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["eve_local"]
    assert results["exact_match,none"] == want
    [samples_file] = out.rglob("*_samples_eve_local.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda r: r["doc_id"]
    )
    assert [r["filtered_resps"] for r in samples] == answers


def test_easy_vqa_task_for_lmms_eval_holds_the_test_questions(tmp_path):
    """The local lmms-eval task: the first N easy-vqa test questions with the evaluation's instruction,
    their answers and existing image files; a task YAML naming that data."""
    import yaml

    from eve.assets import easy_vqa_dir
    from eve.eval.benchmarks import SHORT_ANSWER_PROMPT
    from eve.integrations.lmms_tasks import write_easy_vqa_task

    path = write_easy_vqa_task(tmp_path, limit=5)
    task = yaml.safe_load(path.read_text())
    assert task["task"] == "easy_vqa_local" and task["output_type"] == "generate_until"
    docs = json.loads(Path(task["dataset_kwargs"]["data_files"]["test"]).read_text())
    first = json.loads((easy_vqa_dir("test") / "questions.json").read_text())[:5]
    assert [(d["question"], d["answer"]) for d in docs] == [
        (f"{q}\n{SHORT_ANSWER_PROMPT}", a) for q, a, _ in first
    ]
    assert all(
        Path(d["image"]).is_file() and Path(d["image"]).stem == str(i) for d, (_, _, i) in zip(docs, first)
    )
