"""Web chat with an exported EVE checkpoint: a Gradio page with an image, a question box and streamed answers.

    python -m eve.serve --model runs/demo/sft/export [--host 127.0.0.1 --port 7860 --share false]

Each browser tab holds its own conversation; a new image starts a new one (the model sees one image
at the start of a conversation, as in `eve.chat`), and "Clear" forgets it. Prompts are built by
`eve.chat.ChatSession`: the export's chat template and answer instruction, earlier turns included.
Greedy by default; `--temperature T > 0` samples (with `--top-p`). Needs the `serve` extra (gradio).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from eve.chat import ChatSession, add_model_args
from eve.console import setup_logging
from eve.inference import load_model

logger = logging.getLogger(__name__)

# The page's fonts: the ones the browser has. Gradio's default theme fetches Google Fonts, which a
# server on a cluster without internet access cannot reach.
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


class WebChat:
    """The page's chat function over one shared model; each tab's conversation lives in its own state.

    A tab's state is its list of LLaVA turns (`ChatSession.turns`), plain data that Gradio keeps per
    tab; the model is never copied. Gradio runs one request at a time (its default concurrency
    limit), so the shared model never generates for two tabs at once.
    """

    def __init__(
        self,
        model,
        processor,
        template: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        self.model, self.processor, self.template = model, processor, template
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def session(self, image: Image.Image | None, turns: list[dict[str, str]]) -> ChatSession:
        """A ChatSession about `image` that continues the conversation `turns`."""
        session = ChatSession(
            self.model,
            self.processor,
            self.template,
            image,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
        )
        session.turns = list(turns)
        return session

    def respond(
        self,
        message: str,
        image: Image.Image | None,
        messages: list[dict[str, str]],
        turns: list[dict[str, str]],
    ) -> Iterator[tuple[str, list[dict[str, str]], list[dict[str, str]]]]:
        """(question box, chat messages, turns) as the answer to `message` grows; the last has the new turns.

        `messages` is what the chat shows (`{"role", "content"}` dicts); `turns` is the conversation
        the model sees, which only grows when an answer is complete.
        """
        message = message.strip()
        if not message:
            yield "", messages, turns
            return
        session = self.session(image, turns)
        shown = list(messages) + [{"role": "user", "content": message}]
        yield "", shown + [{"role": "assistant", "content": ""}], turns
        for partial in session.ask_streaming(message):
            yield "", shown + [{"role": "assistant", "content": partial}], turns
        yield "", shown + [{"role": "assistant", "content": partial}], session.turns


def build_page(chat: WebChat, model_name: str = ""):
    """The Gradio Blocks page: image, chat, question box, Send and Clear."""
    import gradio as gr

    with gr.Blocks(title=f"EVE chat {model_name}".strip(), analytics_enabled=False) as page:
        about = f"Model `{model_name}`. " if model_name else ""
        gr.Markdown(
            f"## EVE chat\n{about}Upload an image, then ask about it. A new image starts a new conversation."
        )
        turns = gr.State([])  # this tab's conversation as LLaVA turns
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="pil", label="Image", elem_id="image", sources=["upload", "clipboard"], height=360
                )
            with gr.Column(scale=2):
                messages = gr.Chatbot(label="Conversation", elem_id="chat", height=420, render_markdown=False)
                question = gr.Textbox(
                    label="Question", placeholder="What is in the image?", elem_id="question", lines=1
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")

        inputs, outputs = [question, image, messages, turns], [question, messages, turns]
        send.click(chat.respond, inputs, outputs)
        question.submit(chat.respond, inputs, outputs)

        def forget() -> tuple[list, list]:
            return [], []

        clear.click(forget, None, [messages, turns])
        messages.clear(forget, None, [messages, turns])  # the chat's own trash button
        image.change(forget, None, [messages, turns])
    return page


def theme():
    """Gradio's default theme with local fonts only."""
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def _flag(value: str) -> bool:
    """'true' or 'false' (any case) as a bool, for flags written `--share false`."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    """The `python -m eve.serve` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m eve.serve", description="Web chat with an exported EVE checkpoint."
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--share", type=_flag, default=False, help="true: also a public gradio.live link (needs internet)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: load the export, then serve the page until interrupted."""
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests to itself, one a line
    torch.manual_seed(args.seed)
    try:
        model, processor = load_model(args.model, args.device, args.dtype)
    except FileNotFoundError as e:
        logger.error(str(e))
        return 2
    chat = WebChat(model, processor, args.template, args.max_new_tokens, args.temperature, args.top_p)
    page = build_page(chat, model_name=str(args.model))
    logger.info(f"serving {args.model} on http://{args.host}:{args.port}")
    page.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme())
    return 0


if __name__ == "__main__":
    sys.exit(main())
