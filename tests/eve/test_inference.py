"""eve.inference: batched == one by one, exact stops, loading an export, prompts and batch order."""

import copy

import pytest
import torch
from PIL import Image

from eve import inference
from eve.assets import easy_vqa_dir
from eve.templates import VICUNA_SYSTEM
from tests.conftest import direct_answer, force_reply

IMAGES = easy_vqa_dir("test") / "images"


def mixed_prompts(processor):
    """Prompts of different lengths: a tall and a wide image (different runs) and a text-only one."""
    tall, wide = Image.new("RGB", (16, 32), (200, 30, 30)), Image.new("RGB", (40, 8), (30, 30, 200))
    prompts = [
        processor.build_prompt("What colour is the shape in this picture?", has_image=True),
        processor.build_prompt("Say something about a long and winding road in the hills.", has_image=False),
        processor.build_prompt("Shape?", has_image=True),
    ]
    return prompts, [tall, None, wide]


def test_batched_generate_equals_one_by_one(loaded):
    """One left-padded mixed batch gives each prompt's own greedy answer (generate and generate_all)."""
    model, processor = loaded
    prompts, images = mixed_prompts(processor)
    batched = inference.generate(model, processor, prompts, images, max_new_tokens=5)
    alone = [
        inference.generate(model, processor, [p], [im], max_new_tokens=5)[0] for p, im in zip(prompts, images)
    ]
    reference = [direct_answer(model, processor, p, im, max_new_tokens=5) for p, im in zip(prompts, images)]
    assert batched == alone == reference
    assert all(reference)  # non-empty answers, so equality compares something
    # Many prompts in batches of 2, in length order or as given: the same answers, in input order.
    order = inference.length_order(prompts, images, processor.image_processor)
    for o in (None, order, [2, 0, 1]):
        got = inference.generate_all(
            model, processor, prompts, images, batch_size=2, max_new_tokens=5, order=o
        )
        assert got == reference, o


def test_generation_stops_at_eos_or_max_new_tokens(loaded, tokenizer):
    """A model that answers "no" then eos: answers end at eos, or at max_new_tokens if that comes first."""
    model, processor = loaded
    [no] = tokenizer("no", add_special_tokens=False)["input_ids"]
    rigged = force_reply(copy.deepcopy(model), no, tokenizer.eos_token_id)
    prompts, images = mixed_prompts(processor)
    # The last prompt already ends in "no", so its first new token is eos: an empty answer, while
    # the other rows of the same batch go on to "no".
    prompts[2] = prompts[2] + " no"
    assert inference.generate(rigged, processor, prompts, images, max_new_tokens=6) == ["no", "no", ""]
    assert inference.generate(rigged, processor, prompts[:2], images[:2], max_new_tokens=1) == ["no", "no"]
    # Without an eos id the pattern repeats up to the limit: 5 tokens = no </s> no </s> no.
    [long] = inference.generate(
        rigged, processor, prompts[:1], images[:1], max_new_tokens=5, eos_token_id=None
    )
    assert long == "no no no"


def test_generate_all_skips_unreadable_images(loaded, tmp_path, caplog):
    """A missing file or a failing loader costs its prompt (None, logged); the rest are unchanged."""
    model, processor = loaded
    prompts, images = mixed_prompts(processor)
    want = inference.generate_all(model, processor, prompts, images, max_new_tokens=3)
    missing = tmp_path / "missing.png"

    def broken():
        raise OSError("shard unreadable")

    got = inference.generate_all(
        model, processor, prompts * 2, [missing, None, images[2], images[0], None, broken], max_new_tokens=3
    )
    assert got == [None, want[1], want[2], want[0], want[1], None]
    assert "missing.png" in caplog.text and "shard unreadable" in caplog.text
    with pytest.raises(ValueError, match="permutation"):
        inference.generate_all(model, processor, prompts, images, order=[0, 0, 1])


def test_length_order_hand_computed(processor, tmp_path):
    """Text-only first, then by image tokens (from the header; 1 + h*(w+1)), then prompt length."""
    Image.new("RGB", (32, 32)).save(tmp_path / "square.png")  # 4x4 grid: 21 tokens
    prompts = ["<image>\nlonger question", "a", "<image>\nq", "bb", "<image>\nq"]
    images = [tmp_path / "square.png", None, Image.new("RGB", (32, 8)), None, tmp_path / "gone.png"]
    # 32x8 px -> 1x4 grid: 1 + 1*5 = 6 tokens; the unreadable file counts 0 (it fails when loaded).
    assert inference.length_order(prompts, images, processor.image_processor) == [1, 3, 4, 2, 0]


def test_load_model_gives_the_same_logits(tmp_path, tiny_model, processor):
    """save_pretrained -> load_model: the same weights, processor and logits, in the chosen dtype."""
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, loaded_processor = inference.load_model(tmp_path, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    prompts, images = mixed_prompts(processor)
    batch = processor(prompts, images)
    again = loaded_processor(prompts, images)
    assert all(torch.equal(batch[k], again[k]) for k in batch) and batch.keys() == again.keys()
    with torch.no_grad():
        # Memory-mapped loaded weights may take another CPU GEMM path than fresh ones: ~1 ulp on O(1)
        # logits (see test_save_pretrained_auto_model_round_trip); 1e-6 admits only that rounding.
        torch.testing.assert_close(model(**again).logits, tiny_model(**batch).logits, atol=1e-6, rtol=0)
    half, _ = inference.load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_dtype_choice():
    assert inference.inference_dtype("cuda") == inference.inference_dtype("cuda:1") == torch.bfloat16
    assert inference.inference_dtype("cpu") == torch.float32
    assert inference.inference_dtype("cuda", "float32") == torch.float32
    assert inference.inference_dtype("cpu", "float16") == torch.float16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        inference.inference_dtype("cpu", "fp8")


def test_missing_model_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported checkpoint.*export/"):
        inference.load_model(tmp_path)


def test_conversation_prompt_hand_written():
    turns = [
        {"from": "human", "value": "<image>\nwhat shape?"},
        {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "what colour?"},
    ]
    assert inference.conversation_prompt(turns, "vicuna_v1") == (
        f"{VICUNA_SYSTEM} USER: <image>\nwhat shape? ASSISTANT: circle</s>USER: what colour? ASSISTANT:"
    )
    assert inference.conversation_prompt(turns[:1], "vicuna_v1") == inference.conversation_prompt(
        [{"from": "human", "value": "what shape?"}], "vicuna_v1"
    ).replace("USER: ", "USER: <image>\n")


def test_sampling_kwargs():
    assert inference.sampling_kwargs(0.0) == inference.sampling_kwargs(-1.0) == {"do_sample": False}
    assert inference.sampling_kwargs(0.7, 0.9) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
