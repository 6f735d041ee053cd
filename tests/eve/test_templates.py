"""Chat templates: the exact official strings (hand-written here) and the target pieces."""

import dataclasses

import pytest

from eve.templates import TEMPLATES, VICUNA_SYSTEM, build_prompt, conversation_to_pieces, get_template

CONV = [
    {"from": "human", "value": "What shape is this?\n<image>"},
    {"from": "gpt", "value": "A circle."},
    {"from": "human", "value": "What colour?"},
    {"from": "gpt", "value": "Red"},
]


def test_vicuna_v1_text_and_targets_match_the_official_layout():
    pieces = conversation_to_pieces(CONV, "vicuna_v1")
    text = "".join(t for t, _ in pieces)
    # Official get_prompt (SeparatorStyle.TWO, sep " ", sep2 "</s>") after preprocess_multimodal moved
    # the placeholder to the front of its turn.
    assert text == (
        VICUNA_SYSTEM + " USER: <image>\nWhat shape is this? ASSISTANT: A circle.</s>"
        "USER: What colour? ASSISTANT: Red</s>"
    )
    assert [t for t, target in pieces if target] == [" A circle.</s>", " Red</s>"]
    assert VICUNA_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )


def test_qwen2_text_and_targets_match_the_official_evev2_layout():
    pieces = conversation_to_pieces(CONV, "qwen2")
    # EVEv2's conv_qwen_v2: the Vicuna system text, roles USER/ASSISTANT, sep " ", sep2 "<|im_end|>";
    # preprocess_eve supervises each answer with its sep2.
    assert "".join(t for t, _ in pieces) == (
        VICUNA_SYSTEM + " USER: <image>\nWhat shape is this? ASSISTANT: A circle.<|im_end|>"
        "USER: What colour? ASSISTANT: Red<|im_end|>"
    )
    assert [t for t, target in pieces if target] == [" A circle.<|im_end|>", " Red<|im_end|>"]


def test_plain_drops_the_human_text_and_supervises_caption_and_newline():
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red circle."}]
    assert conversation_to_pieces(conv, "plain") == [("<image>", False), ("A red circle.\n", True)]
    text_only = [{"from": "human", "value": ""}, {"from": "gpt", "value": "Just text."}]
    assert conversation_to_pieces(text_only, "plain") == [("Just text.\n", True)]


def test_generation_prompts():
    assert (
        build_prompt("What is it?", "vicuna_v1") == VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
    )
    assert build_prompt("Hi", "vicuna_v1", has_image=False) == VICUNA_SYSTEM + " USER: Hi ASSISTANT:"
    assert build_prompt("ignored", "plain") == "<image>"


@pytest.mark.parametrize(
    "conv, match",
    [
        ([], "empty conversation"),
        ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], "expected 'human'"),
        ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}], "expected 'gpt'"),
        ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}], "images go in human turns"),
        ([{"from": "human", "value": "x"}], "must end with gpt"),
        ([{"from": "human"}], "string 'value'"),
    ],
)
def test_malformed_conversations_name_the_sample(conv, match):
    with pytest.raises(ValueError, match=match) as err:
        conversation_to_pieces(conv, "vicuna_v1", sample="sample 42")
    assert "sample 42" in str(err.value)


def test_plain_takes_one_pair_and_templates_are_frozen_data():
    with pytest.raises(ValueError, match="at most 1"):
        conversation_to_pieces(CONV, "plain")
    with pytest.raises(ValueError, match="Unknown chat template"):
        get_template("chatml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEMPLATES["plain"].answer_suffix = ""
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "qwen2"}
