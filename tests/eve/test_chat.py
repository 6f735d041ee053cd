"""`python -m eve.chat` one-shot and REPL on a tiny random checkpoint, against `model.generate` on
prompts written out by hand."""

import io

import torch

from eve import chat
from eve.assets import easy_vqa_dir
from eve.templates import VICUNA_SYSTEM
from tests.conftest import direct_answer

IMAGES = easy_vqa_dir("test") / "images"


def test_one_shot_prints_the_greedy_continuation(tiny_checkpoint, loaded, capsys):
    model, processor = loaded
    argv = ["--model", str(tiny_checkpoint), "--image", str(IMAGES / "0.png"), "--prompt", "What shape?"]
    assert chat.main(argv + ["--max-new-tokens", "3", "--device", "cpu"]) == 0
    prompt = f"{VICUNA_SYSTEM} USER: <image>\nWhat shape? ASSISTANT:"
    want = direct_answer(model, processor, prompt, chat.load_image(IMAGES / "0.png"), max_new_tokens=3)
    assert want  # a random model still says something, so the comparison is not "" == ""
    assert capsys.readouterr().out == want + "\n"


def test_one_shot_bad_image_fails_before_loading(tmp_path, capsys):
    assert chat.main(["--model", str(tmp_path), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().out == ""


def test_repl_multi_turn_image_switch_and_reset(loaded):
    model, processor = loaded
    session = chat.ChatSession(model, processor, image=chat.load_image(IMAGES / "0.png"), max_new_tokens=3)
    stdin = io.StringIO(
        f"what shape?\nwhat colour?\n/image {IMAGES / '1.png'}\nis it red?\n/image /nope.png\n/reset\n/bogus\n/quit\nnever read\n"
    )
    stdout = io.StringIO()
    chat.repl(session, stdin, stdout)
    out = stdout.getvalue()
    answers = [line[len("ASSISTANT: ") :] for line in out.splitlines() if line.startswith("ASSISTANT: ")]

    # The same three turns built by hand: the second carries the first answer, the image switch
    # starts a new conversation whose first turn carries the new image.
    first = f"{VICUNA_SYSTEM} USER: <image>\nwhat shape? ASSISTANT:"
    a1 = direct_answer(model, processor, first, chat.load_image(IMAGES / "0.png"))
    second = f"{first} {a1}</s>USER: what colour? ASSISTANT:"
    a2 = direct_answer(model, processor, second, chat.load_image(IMAGES / "0.png"))
    third = f"{VICUNA_SYSTEM} USER: <image>\nis it red? ASSISTANT:"
    a3 = direct_answer(model, processor, third, chat.load_image(IMAGES / "1.png"))
    assert answers == [a1, a2, a3]
    assert "new conversation about" in out and "error:" in out and "conversation reset" in out
    assert "unknown command '/bogus'" in out
    assert session.turns == []  # /reset emptied the history


def test_prompt_keeps_history_and_one_image(loaded):
    model, processor = loaded
    session = chat.ChatSession(model, processor, image=chat.load_image(IMAGES / "0.png"))
    session.turns = [{"from": "human", "value": "<image>\nwhat shape?"}, {"from": "gpt", "value": "circle"}]
    prompt = session.prompt("what colour?")
    assert prompt == (
        f"{VICUNA_SYSTEM} USER: <image>\nwhat shape? ASSISTANT: circle</s>USER: what colour? ASSISTANT:"
    )


def test_sampling_flags_reach_generate(loaded):
    """temperature/top_p sample exactly as `model.generate(do_sample=True, ...)` under the same seed."""
    model, processor = loaded
    session = chat.ChatSession(model, processor, max_new_tokens=3, temperature=0.7, top_p=0.9)
    torch.manual_seed(5)
    sampled = session.ask("Hello")
    prompt = f"{VICUNA_SYSTEM} USER: Hello ASSISTANT:"
    torch.manual_seed(5)
    want = direct_answer(model, processor, prompt, do_sample=True, temperature=0.7, top_p=0.9)
    assert sampled == want
    # A random model's next-token distribution is nearly flat over 32000 tokens, so three sampled
    # tokens equal the greedy ones with negligible probability: this shows sampling happened.
    assert sampled != direct_answer(model, processor, prompt)


def test_answer_instruction_of_the_export_is_added_to_plain_questions(
    tiny_checkpoint, loaded, tmp_path, capsys
):
    # An export whose processor carries an answer instruction (what `export.answer_instruction` saves):
    # chat and build_prompt ask a plain question in the fine-tuned form, once, and the evaluation's
    # own prompts stay as they are (instruct=False).
    import shutil

    from eve.processing_eve import EveProcessor

    model, _ = loaded
    export = tmp_path / "export"
    shutil.copytree(tiny_checkpoint, export)
    instruction = "Answer the question using a single word or phrase."
    processor = EveProcessor.from_pretrained(export)
    processor.answer_instruction = instruction
    processor.save_pretrained(export)
    processor = EveProcessor.from_pretrained(export)
    assert processor.answer_instruction == instruction
    want_prompt = f"{VICUNA_SYSTEM} USER: <image>\nwhat shape?\n{instruction} ASSISTANT:"
    assert processor.build_prompt("what shape?") == want_prompt
    assert processor.build_prompt(f"what shape?\n{instruction}") == want_prompt
    assert (
        processor.build_prompt("what shape?", instruct=False)
        == f"{VICUNA_SYSTEM} USER: <image>\nwhat shape? ASSISTANT:"
    )
    argv = ["--model", str(export), "--image", str(IMAGES / "0.png"), "--prompt", "what shape?"]
    assert chat.main(argv + ["--max-new-tokens", "3", "--device", "cpu"]) == 0
    want = direct_answer(model, processor, want_prompt, chat.load_image(IMAGES / "0.png"), max_new_tokens=3)
    assert capsys.readouterr().out == want + "\n"
