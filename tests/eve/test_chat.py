"""`python -m eve.chat` one-shot and REPL on a tiny random checkpoint."""

import io

from eve import chat
from eve.assets import easy_vqa_dir
from tests.eve.test_eval_runner import loaded, tiny_checkpoint  # noqa: F401 (module fixtures)


def test_one_shot(tiny_checkpoint, capsys):  # noqa: F811
    image = easy_vqa_dir("test") / "images" / "0.png"
    argv = ["--model", str(tiny_checkpoint), "--image", str(image), "--prompt", "What shape?"]
    assert chat.main(argv + ["--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_repl_multi_turn_image_switch_and_reset(loaded):  # noqa: F811
    model, processor = loaded
    images = easy_vqa_dir("test") / "images"
    session = chat.ChatSession(model, processor, image=chat.load_image(images / "0.png"), max_new_tokens=3)
    stdin = io.StringIO(
        f"what shape?\nwhat colour?\n/image {images / '1.png'}\nis it red?\n/image /nope.png\n/reset\n/bogus\n/quit\nnever read\n"
    )
    stdout = io.StringIO()
    chat.repl(session, stdin, stdout)
    out = stdout.getvalue()
    assert out.count("ASSISTANT:") == 3
    assert "new conversation about" in out and "error:" in out and "conversation reset" in out
    assert "unknown command '/bogus'" in out
    assert session.turns == []  # /reset emptied the history


def test_prompt_keeps_history_and_one_image(loaded):  # noqa: F811
    model, processor = loaded
    session = chat.ChatSession(
        model, processor, image=chat.load_image(easy_vqa_dir("test") / "images" / "0.png")
    )
    session.turns = [{"from": "human", "value": "<image>\nwhat shape?"}, {"from": "gpt", "value": "circle"}]
    prompt = session.prompt("what colour?")
    assert prompt.count("<image>") == 1
    assert prompt.endswith("USER: <image>\nwhat shape? ASSISTANT: circle</s>USER: what colour? ASSISTANT:")


def test_sampling_flags(loaded):  # noqa: F811
    model, processor = loaded
    session = chat.ChatSession(model, processor, max_new_tokens=3, temperature=0.7, top_p=0.9)
    assert isinstance(session.ask("Hello"), str)
