"""Chat with an exported EVE checkpoint: one-shot or an interactive multi-turn REPL.

    python -m eve.chat --model runs/demo/sft/export --image photo.png --prompt "What is in the image?"
    python -m eve.chat --model runs/demo/sft/export [--image photo.png]      # interactive

REPL commands: `/image PATH` (switch image; starts a new conversation, since the model sees one
image at the start of a conversation), `/reset` (forget the conversation), `/quit`, `/help`.
Greedy by default; `--temperature T > 0` samples (with `--top-p`). Template `vicuna_v1`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TextIO

import torch
from PIL import Image

from eve.image_processing_eve import ImageLoadError, load_image
from eve.inference import DTYPES, conversation_prompt, generate, load_model
from eve.templates import GPT, HUMAN, IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

HELP = "commands: /image PATH (new conversation about PATH), /reset, /quit, /help"


class ChatSession:
    """A multi-turn conversation about at most one image, kept as LLaVA turns."""

    def __init__(
        self,
        model,
        processor,
        template: str | None = None,
        image: Image.Image | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        self.model, self.processor = model, processor
        self.template = template or processor.template
        self.image = image
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.turns = []

    def set_image(self, image: Image.Image | None) -> None:
        """Switch to another image and start a new conversation about it."""
        self.image = image
        self.reset()

    def _user_value(self, message: str) -> str:
        """`message` as the next human turn, followed by the model's answer instruction if its export
        has one (the form it was fine-tuned with); the first turn about an image carries its placeholder."""
        message = self.processor.instruct(message)
        if not self.turns and self.image is not None and IMAGE_PLACEHOLDER not in message:
            return f"{IMAGE_PLACEHOLDER}\n{message}"
        return message

    def prompt(self, message: str) -> str:
        """The full generation prompt: the history plus `message` as the next user turn."""
        return conversation_prompt(
            self.turns + [{"from": HUMAN, "value": self._user_value(message)}], self.template
        )

    def _answer(self, message: str, **generate_kwargs) -> str:
        """The model's answer to `message` after the history (the history is left as it is)."""
        [answer] = generate(
            self.model,
            self.processor,
            [self.prompt(message)],
            [self.image],
            self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            **generate_kwargs,
        )
        return answer

    def _remember(self, message: str, answer: str) -> None:
        """Append one exchange to the history."""
        self.turns += [{"from": HUMAN, "value": self._user_value(message)}, {"from": GPT, "value": answer}]

    def ask(self, message: str) -> str:
        """The model's answer to `message`; both are appended to the history."""
        answer = self._answer(message)
        self._remember(message, answer)
        return answer

    def ask_streaming(self, message: str) -> Iterator[str]:
        """The answer to `message` as it grows, a few tokens at a time; the last value is `ask`'s answer.

        `generate` runs in a thread and feeds a TextIteratorStreamer, which releases text at word
        boundaries. The partial texts are for display: the last value is the whole answer decoded at
        once (as `ask` returns it), and only that one joins the history.
        """
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, str | BaseException] = {}

        def run() -> None:
            try:
                result["answer"] = self._answer(message, streamer=streamer)
            except BaseException as e:  # re-raised below; end() so that the loop below stops
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, name="eve-chat-generate", daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            if piece.strip():  # the streamer also releases empty pieces (tokens not yet a whole word)
                yield text.strip()
        thread.join()
        if "error" in result:
            raise result["error"]
        self._remember(message, result["answer"])
        yield result["answer"]


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read user lines from `stdin` until /quit or end of input; write answers to `stdout`."""
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"EVE chat ({HELP})\n")
    while True:
        if interactive:
            stdout.write("USER: ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/help":
            stdout.write(HELP + "\n")
        elif line == "/reset":
            session.reset()
            stdout.write("(conversation reset)\n")
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.set_image(load_image(path) if path else None)
                stdout.write(
                    f"(new conversation about {path})\n" if path else "(no image; new conversation)\n"
                )
            except ImageLoadError as e:
                stdout.write(f"error: {e}\n")
        elif line.startswith("/"):
            stdout.write(f"unknown command {line.split()[0]!r}; {HELP}\n")
        else:
            stdout.write(f"ASSISTANT: {session.ask(line)}\n")
        stdout.flush()


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and generation options shared by `eve.chat` and `eve.serve`."""
    p.add_argument("--model", required=True, help="exported checkpoint directory")
    p.add_argument("--template", default=None, help="chat template (default: the processor's, vicuna_v1)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=DTYPES)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m eve.chat` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m eve.chat", description="Chat with an exported EVE checkpoint."
    )
    add_model_args(p)
    p.add_argument("--image", default=None, help="image to talk about")
    p.add_argument("--prompt", default=None, help="ask once, print the answer and exit (else interactive)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    try:  # a bad path fails before the model loads, with the message and no traceback
        image = load_image(args.image) if args.image else None
        model, processor = load_model(args.model, args.device, args.dtype)
    except (ImageLoadError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    session = ChatSession(
        model, processor, args.template, image, args.max_new_tokens, args.temperature, args.top_p
    )
    if args.prompt is not None:
        print(session.ask(args.prompt))
    else:
        repl(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
