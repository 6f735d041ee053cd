"""`python -m eve.serve`: the chat function against `model.generate` on prompts written out by hand, and
the page itself in a real browser (Debian's chromium, headless, driven by Selenium) against `eve.chat`."""

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from eve import chat, serve
from eve.assets import easy_vqa_dir
from eve.templates import VICUNA_SYSTEM
from tests.conftest import direct_answer

IMAGES = easy_vqa_dir("test") / "images"
INSTRUCTION = "Answer the question using a single word or phrase."
REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def instructed(processor):
    """A copy of `processor` with an answer instruction, as `export.answer_instruction` saves it."""
    processor = copy.copy(processor)
    processor.answer_instruction = INSTRUCTION
    return processor


def test_answer_streams_to_the_greedy_answer_and_the_second_turn_carries_the_first(loaded):
    model, processor = loaded
    processor = instructed(processor)
    image = chat.load_image(IMAGES / "0.png")
    web = serve.WebChat(model, processor, max_new_tokens=12)

    first = list(web.respond("what shape?", image, [], []))
    prompt = f"{VICUNA_SYSTEM} USER: <image>\nwhat shape?\n{INSTRUCTION} ASSISTANT:"
    want = direct_answer(model, processor, prompt, image, max_new_tokens=12)
    assert len(want.split()) >= 3  # a random model says several words: there is something to stream
    partials = [messages[-1]["content"] for _, messages, _ in first]
    assert partials[0] == ""  # the empty answer bubble shows at once
    assert partials[-1] == want
    # Streaming: the answer grows word by word, each view a prefix of the final answer.
    assert len(set(partials)) >= 3
    assert all(want.startswith(p) for p in partials)
    assert [len(p) for p in partials] == sorted(len(p) for p in partials)
    assert all(box == "" for box, _, _ in first)  # the question box empties on send
    # The conversation the model sees grows only once the answer is complete.
    assert all(turns == [] for _, _, turns in first[:-1])
    _, messages, turns = first[-1]
    assert messages == [{"role": "user", "content": "what shape?"}, {"role": "assistant", "content": want}]
    assert turns == [
        {"from": "human", "value": f"<image>\nwhat shape?\n{INSTRUCTION}"},
        {"from": "gpt", "value": want},
    ]

    *_, (_, messages, turns) = web.respond("what colour?", image, messages, turns)
    second = f"{prompt} {want}</s>USER: what colour?\n{INSTRUCTION} ASSISTANT:"
    want2 = direct_answer(model, processor, second, image, max_new_tokens=12)
    assert messages[2:] == [
        {"role": "user", "content": "what colour?"},
        {"role": "assistant", "content": want2},
    ]
    assert len(turns) == 4 and turns[3] == {"from": "gpt", "value": want2}


def test_empty_question_changes_nothing(loaded):
    model, processor = loaded
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    assert list(serve.WebChat(model, processor).respond("  ", None, history, turns)) == [("", history, turns)]


def test_generation_error_is_raised_not_waited_for(loaded, monkeypatch):
    """A failure inside the generation thread reaches the caller (the streamer would otherwise wait forever)."""

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(chat, "generate", fail)
    session = chat.ChatSession(*loaded)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(session.ask_streaming("hi"))
    assert session.turns == []


def test_cli_flags_and_a_missing_export(tmp_path):
    parse = serve.build_parser().parse_args
    args = parse(["--model", "m"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert parse(["--model", "m", "--share", "True"]).share is True
    assert parse(["--model", "m", "--share", "false"]).share is False
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--share", "maybe"])
    assert serve.main(["--model", str(tmp_path)]) == 2  # no config.json: an error, not a page


# ------------------------------------------------------------------------------------------ browser
def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Return once `url` answers; fail with the server's log if it exits or takes longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"eve.serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"eve.serve did not answer at {url} within {timeout_s} s:\n{log.read_text()}")


def screenshot_path(tmp_path: Path) -> Path:
    """runs/serve_test/screenshot.png, or one under tmp_path when runs/ is not writable."""
    folder = REPO / "runs" / "serve_test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder / "screenshot.png"
    except OSError:
        pass
    print(f"{folder} is not writable; the screenshot goes under {tmp_path}")
    return tmp_path / "screenshot.png"


@pytest.mark.slow
def test_page_in_a_real_browser(tiny_checkpoint, tmp_path):
    """Upload a PNG, ask two questions, see eve.chat's greedy answers, clear; screenshot under runs/."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (`make browser` installs them)")
    pytest.importorskip("gradio", reason="needs the `serve` extra (make install)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (make install)")
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from eve.inference import load_model
    from eve.processing_eve import EveProcessor

    # An export with an answer instruction, and a real PNG: a red disc on white.
    export = tmp_path / "export"
    shutil.copytree(tiny_checkpoint, export)
    instructed(EveProcessor.from_pretrained(export)).save_pretrained(export)
    png = tmp_path / "disc.png"
    image = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(image).ellipse((8, 4, 40, 36), fill=(220, 30, 30))
    image.save(png)

    # What `python -m eve.chat` answers (greedy, the same export and image, on CPU in fp32 like the server).
    questions = ["what shape is it?", "what colour?"]
    session = chat.ChatSession(
        *load_model(export, device="cpu"), image=chat.load_image(png), max_new_tokens=8
    )
    want = [session.ask(q) for q in questions]
    assert all(want)  # a random model still says something, so the comparison is not "" == ""

    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    argv = ["--model", str(export), "--port", str(port), "--device", "cpu", "--max-new-tokens", "8"]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "eve.serve", *argv],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # root in a container: no sandbox; /dev/shm is often small there
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for_page(url, server, log)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(png))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))

        def answers(d) -> list[str]:
            # read in one script: the chat re-renders its messages while an answer streams in
            return d.execute_script(
                "return Array.from(document.querySelectorAll('#chat [data-testid=\"bot\"] .message-content'),"
                " e => e.textContent.trim())"
            )

        for i, question in enumerate(questions):
            driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
            driver.find_element(By.CSS_SELECTOR, "#send").click()
            try:  # the answer streams in; wait until it is whole (a wrong one fails the assert below)
                wait.until(lambda d, n=i + 1: answers(d) == want[:n])
            except TimeoutException:
                pass
            assert answers(driver) == want[: i + 1], f"server log:\n{log.read_text()}"
        shot = screenshot_path(tmp_path)
        assert driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")

        # Clear forgets the conversation, not just the view: the first question gets its first answer again.
        driver.find_element(By.CSS_SELECTOR, "#clear").click()
        wait.until(lambda d: answers(d) == [])
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(questions[0])
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        try:
            wait.until(lambda d: answers(d) == want[:1])
        except TimeoutException:
            pass
        assert answers(driver) == want[:1]
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
