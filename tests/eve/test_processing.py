"""EveProcessor: hand-written label masks, image runs, prompt/sample agreement, validation, persistence."""

import pytest
import torch
from PIL import Image

from eve.assets import skimage_photo
from eve.configuration_eve import IGNORE_INDEX
from eve.processing_eve import EveProcessor
from eve.templates import VICUNA_SYSTEM, conversation_to_pieces

IMG = -200


def red(width=32, height=32):
    return Image.new("RGB", (width, height), (255, 0, 0))


def labelled(tokenizer, out):
    """The supervised tokens as strings."""
    return tokenizer.convert_ids_to_tokens([t for t in out["labels"] if t != IGNORE_INDEX])


def text_tokens(tokenizer, ids):
    """Token strings with image ids shown as "<IMG>"."""
    return ["<IMG>" if i == IMG else tokenizer.convert_ids_to_tokens(i) for i in ids]


def test_plain_mask_hand_written(processor, tokenizer):
    conv = [{"from": "human", "value": "<image>\nignored"}, {"from": "gpt", "value": "A red circle."}]
    out = processor.encode(conv, red(), template="plain")
    run = 1 + 4 * 5  # 32 x 32 px at 8 px per token: a 4 x 4 grid
    assert text_tokens(tokenizer, out["input_ids"]) == (
        ["<s>"] + ["<IMG>"] * run + ["▁A", "▁red", "▁circle", ".", "<0x0A>"]
    )
    assert labelled(tokenizer, out) == ["▁A", "▁red", "▁circle", ".", "<0x0A>"]
    assert out["labels"][: 1 + run] == [IGNORE_INDEX] * (1 + run)
    assert out["image_grid_hw"].tolist() == [[4, 4]] and out["pixel_values"].shape == (64, 48)


def test_vicuna_mask_hand_written(processor, tokenizer):
    conv = [
        {"from": "human", "value": "What shape?\n<image>"},
        {"from": "gpt", "value": "Circle"},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    out = processor.encode(conv, red(32, 16))
    run = 1 + 2 * 5  # 32 wide x 16 high -> a 2 x 4 grid
    tokens = text_tokens(tokenizer, out["input_ids"])
    system = tokenizer.convert_ids_to_tokens(tokenizer(VICUNA_SYSTEM, add_special_tokens=False).input_ids)
    # The official LLaVA/EVE sequence: "USER: " ends in a lone "▁"; the text after <image> starts with
    # SentencePiece's dummy "▁" then the newline byte; "</s>USER" re-starts with "▁US".
    assert tokens == (
        ["<s>", *system, "▁US", "ER", ":", "▁"]
        + ["<IMG>"] * run
        + ["▁", "<0x0A>", "What", "▁shape", "?", "▁ASS", "IST", "ANT", ":", "▁Circle", "</s>"]
        + ["▁US", "ER", ":", "▁Col", "our", "?", "▁ASS", "IST", "ANT", ":", "▁Red", ".", "</s>"]
    )
    assert labelled(tokenizer, out) == ["▁Circle", "</s>", "▁Red", ".", "</s>"]
    assert len(out["input_ids"]) == len(out["labels"])


@pytest.mark.parametrize("width, height, grid", [(100, 37, (2, 4)), (37, 100, (4, 2)), (1, 500, (4, 1))])
def test_image_run_is_one_plus_h_times_w_plus_one(processor, width, height, grid):
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    out = processor.encode(conv, red(width, height))
    h, w = grid
    assert out["image_grid_hw"].tolist() == [[h, w]]
    ids = out["input_ids"]
    first = ids.index(IMG)
    n = ids.count(IMG)
    assert n == 1 + h * (w + 1) and ids[first : first + n] == [IMG] * n  # one contiguous run


def test_full_size_run_length(tokenizer):
    from eve import EveConfig

    config = EveConfig.from_preset("eve-7b")
    proc = EveProcessor.from_config(tokenizer, config)
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    for (width, height), grid in {(672, 672): (24, 24), (100, 37): (9, 24), (37, 100): (24, 9)}.items():
        out = proc.encode(conv, red(width, height), template="plain")
        assert out["input_ids"].count(IMG) == config.num_image_tokens(*grid)


def test_generation_prompt_is_a_token_prefix_and_answers_tokenize_alone(processor, tokenizer):
    """For every assistant turn: the prompt up to it, encoded for generation, equals the sample's prefix;
    the supervised tokens equal the answer tokenized on its own plus </s> (segment == joined)."""
    conv = [
        {"from": "human", "value": "<image>\nHow many shapes are there?"},
        {"from": "gpt", "value": "Two: a triangle and 1 square."},
        {"from": "human", "value": "Which is bigger?"},
        {"from": "gpt", "value": "The square, by 20%."},
    ]
    image = skimage_photo("astronaut.png")
    out = processor.encode(conv, image)
    ids, labels = out["input_ids"], out["labels"]
    starts = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert len(starts) == 2
    for turn, start in enumerate(starts):
        history = conv[: 2 * turn + 1]
        prompt = "".join(
            t for t, _ in conversation_to_pieces(history, "vicuna_v1", add_generation_prompt=True)
        )
        batch = processor([prompt], [image])
        assert batch["input_ids"][0].tolist() == ids[:start]
        answer = tokenizer(conv[2 * turn + 1]["value"], add_special_tokens=False).input_ids
        assert labels[start : start + len(answer) + 1] == answer + [tokenizer.eos_token_id]
    torch.testing.assert_close(batch["pixel_values"], out["pixel_values"])


@pytest.mark.parametrize(
    "conv, with_image, match",
    [
        ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], True, "0 <image>"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}], False, "1 <image>"),
        ([{"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}], True, "2 <image>"),
        ([], True, "empty conversation"),
        ([{"from": "gpt", "value": "<image>A"}, {"from": "human", "value": "Q"}], True, "expected 'human'"),
        ([{"from": "human", "value": "<image>Q"}, {"from": "user", "value": "A"}], True, "expected 'gpt'"),
        ([{"from": "human", "value": 5}, {"from": "gpt", "value": "A"}], False, "string 'value'"),
        ([{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": None}], True, "string 'value'"),
    ],
)
def test_invalid_samples_raise_naming_the_sample(processor, conv, with_image, match):
    with pytest.raises(ValueError, match=match) as err:
        processor.encode(conv, red() if with_image else None, sample_id="llava-0017")
    assert "sample llava-0017" in str(err.value)


def test_bad_image_names_sample_and_file(processor, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(ValueError, match="sample 3.*broken.jpg"):
        processor.encode(conv, bad, sample_id=3)


def test_text_only_sample(processor, tokenizer):
    out = processor.encode([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}])
    assert "pixel_values" not in out and IMG not in out["input_ids"]
    assert labelled(tokenizer, out) == ["▁Hello", "!", "</s>"]


def test_truncation_never_cuts_an_image_run(processor):
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A long answer " * 5}]
    full = processor.encode(conv, red())
    first, run = full["input_ids"].index(IMG), full["input_ids"].count(IMG)

    kept = processor.encode(conv, red(), max_length=first + run + 3)
    assert kept["truncated"] and len(kept["input_ids"]) == first + run + 3 and "pixel_values" in kept
    assert kept["input_ids"] == full["input_ids"][: first + run + 3]

    dropped = processor.encode(conv, red(), max_length=first + 5)  # inside the run
    assert dropped["truncated"] and dropped["input_ids"] == full["input_ids"][:first]
    assert "pixel_values" not in dropped and IMG not in dropped["input_ids"]

    whole = processor.encode(conv, red(), max_length=10_000)
    assert whole["truncated"] is False and whole["input_ids"] == full["input_ids"]
    assert "truncated" not in full


def test_generation_batch_left_padding(processor, tokenizer):
    questions = ["What colour is the big shape in this picture?", "Hi"]
    images = [red(32, 16), None]
    batch = processor(questions, images, template="vicuna_v1")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    one = processor([processor.build_prompt(questions[0], "vicuna_v1", True)], [images[0]])
    two = processor([processor.build_prompt(questions[1], "vicuna_v1", False)], [None])
    n1, n2 = one["input_ids"].shape[1], two["input_ids"].shape[1]
    assert ids.shape == (2, max(n1, n2)) and n1 > n2
    assert ids[1, : n1 - n2].tolist() == [tokenizer.pad_token_id] * (n1 - n2)
    assert mask[1].tolist() == [0] * (n1 - n2) + [1] * n2 and mask[0].all()
    assert ids[1, n1 - n2 :].tolist() == two["input_ids"][0].tolist()
    assert batch["image_grid_hw"].tolist() == [[2, 4]]
    right = processor(questions, images, template="vicuna_v1", padding_side="right")
    assert right["input_ids"][1, :n2].tolist() == two["input_ids"][0].tolist()
    text = processor([processor.build_prompt("Hi", has_image=False)])
    assert "pixel_values" not in text
    with pytest.raises(ValueError, match="prompt 0: has 0 <image>"):
        processor(["no placeholder"], [red()])
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        processor(["a", "b"], [None])
    assert processor.batch_decode(two["input_ids"], skip_special_tokens=True)[0].endswith(
        "USER: Hi ASSISTANT:"
    )


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    back = EveProcessor.from_pretrained(tmp_path)
    assert (back.image_token_index, back.template) == (processor.image_token_index, processor.template)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A rocket."}]
    a, b = processor.encode(conv, skimage_photo("rocket.jpg")), back.encode(conv, skimage_photo("rocket.jpg"))
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=0, rtol=0)
