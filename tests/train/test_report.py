"""The run report (train/report.py) on a small run directory built from the pieces a demo writes."""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from eve.assets import easy_vqa_dir
from train.report import SECTIONS, stage_order, write_report

SECTION_IDS = [sid for sid, _, _ in SECTIONS]

# An evaluation result in the format eve.eval writes (eval/easy_vqa.json), with fractions that are
# not round percentages so that a wrong cell would show.
RESULT = {
    "benchmark": "easy_vqa",
    "accuracy": 0.8125,
    "n": 16,
    "per_category": {"colour": {"accuracy": 0.75, "n": 4}, "yes/no": {"accuracy": 10 / 12, "n": 12}},
    "baselines": {
        "majority": {
            "answer": "yes",
            "accuracy": 0.375,
            "n": 16,
            "per_category": {"colour": {"accuracy": 0.0, "n": 4}, "yes/no": {"accuracy": 0.5, "n": 12}},
        },
        "question_only": {
            "accuracy": 0.5625,
            "n": 16,
            "per_category": {"colour": {"accuracy": 0.25, "n": 4}, "yes/no": {"accuracy": 2 / 3, "n": 12}},
        },
    },
    "seconds": 2.0,
    "questions_per_s": 8.0,
}


class Page(HTMLParser):
    """The report's sections: id -> their text, their <img> sources and their <pre> texts."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: dict | None = None
        self.in_pre = self.in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = self.sections[attrs["id"]] = {"text": "", "images": [], "pre": [], "h2": ""}
        elif self.current is not None and tag == "img":
            self.current["images"].append(attrs["src"])
        elif tag == "pre":
            self.in_pre = True
            self.current["pre"].append("")
        elif tag == "h2":
            self.in_h2 = True

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        elif tag == "pre":
            self.in_pre = False
        elif tag == "h2":
            self.in_h2 = False

    def handle_data(self, data):
        if self.current is None:
            return
        self.current["text"] += data
        if self.in_pre:
            self.current["pre"][-1] += data
        if self.in_h2:
            self.current["h2"] += data


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path) -> Path:
    """A finished EVE demo run in miniature: two stages, curation report with a montage of real
    easy-vqa images, an evaluation with predictions on real test images, summary and timings."""
    run = root / "run"
    test_images = easy_vqa_dir("test") / "images"
    for stage, align in (("stage1", True), ("sft", False)):
        rows = [
            {"step": s, "ce_loss": 5.0 / s, "lr": 1e-3 * s, "tokens_per_s": 100.0 * s}
            | ({"align_loss": 1.0 / s} if align else {})
            for s in range(1, 5)
        ]
        write_lines(run / stage / "metrics.jsonl", rows)
        (run / stage / "config.json").write_text(
            json.dumps({"stage": {"name": stage}, "optim": {"lr": 1e-3}})
        )
        (run / stage / "export").mkdir()
        (run / stage / "run.json").write_text(json.dumps({"run_id": "x", "started": "2026-01-02 03:04:05"}))
    report_dir = run / "data" / "curated" / "report"
    report_dir.mkdir(parents=True)
    montage = Image.new("RGB", (4 * 64, 64), "white")
    for i in range(4):
        with Image.open(test_images / f"{i}.png") as img:
            montage.paste(img.convert("RGB"), (64 * i, 0))
    montage.save(report_dir / "montage.png")
    counts = {
        "scanned": 48,
        "dropped_duplicate": 2,
        "selected": 40,
        "written": 40,
        "by_source": {"easy_vqa": 40},
    }
    curation = {"counts": counts, "timings_s": {"scan": 0.5}, "cluster": {"k": 4}, "config": {"seed": 0}}
    (report_dir / "report.json").write_text(json.dumps(curation))
    (run / "eval").mkdir()
    (run / "eval" / "easy_vqa.json").write_text(json.dumps(RESULT))
    predictions = [
        {
            "id": str(i),
            "image": str(test_images / f"{i // 2}.png"),
            "question": f"question {i}?",
            "answers": ["yes"],
            "prediction": "yes" if i % 3 else "no",
            "score": 1.0 if i % 3 else 0.0,
            "category": "yes/no",
        }
        for i in range(8)
    ]
    write_lines(run / "eval" / "easy_vqa_predictions.jsonl", predictions)
    timings = {"curate": 30.0, "stage1": 60.0, "sft": 90.0, "eval": 12.0, "total": 192.0}
    (run / "demo_timings.json").write_text(json.dumps(timings))
    summary = {
        "seed": 0,
        "threads": "2",
        "timings_s": timings,
        "easy_vqa": RESULT,
        "align": True,
        "arch": "eve",
    }
    summary["chat_check"] = {
        "n": 1,
        "right": 1,
        "answers": [{"image": 0, "question": "q?", "answer": "red", "truth": "red"}],
    }
    (run / "demo_summary.json").write_text(json.dumps(summary))
    return run


def decode(uri: str) -> Image.Image:
    """The image of a PNG or JPEG data URI, fully decoded."""
    head, data = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    img.load()
    return img


def test_report_has_every_section_and_only_decodable_embedded_images(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    page = Page(text)
    assert list(page.sections) == SECTION_IDS
    assert all(s["h2"] for s in page.sections.values())
    assert 'class="missing"' not in text  # every input is there
    # Self-contained: no image or link points at a file.
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    images = {sid: [decode(u) for u in s["images"]] for sid, s in page.sections.items()}
    assert [img.size for img in images["curation"]] == [(256, 64)]  # the montage, whole
    assert len(images["training"]) == 2  # one plot per stage
    # 3 first images + the first other one with a wrong answer (image 3: prediction 6 is wrong).
    assert [img.size for img in images["evaluation"]] == [(64, 64)] * 4
    # Stages in pipeline order, with their steps and mean tokens/s past the warm-up step (100 * mean(2..4)).
    training = page.sections["training"]["text"]
    assert training.index("stage1") < training.index("sft") and "300" in training
    assert "192" in page.sections["timings"]["text"]
    assert "81.2% on 16 questions" in page.sections["summary"]["text"]
    configs = page.sections["configs"]["pre"]
    assert [json.loads(c) for c in configs][1:] == [
        {"stage": {"name": s}, "optim": {"lr": 1e-3}} for s in ("stage1", "sft")
    ]


def test_evaluation_table_numbers_equal_the_json(tmp_path):
    page = Page(write_report(make_run(tmp_path)).read_text())
    (table,) = page.sections["evaluation"]["pre"]
    rows = {
        line.split("(")[0].strip(): [float(x) for x in re.findall(r"(\d+\.\d)%", line)]
        for line in table.splitlines()
        if "%" in line
    }
    base = RESULT["baselines"]
    expected = {
        "overall": [RESULT["accuracy"], base["majority"]["accuracy"], base["question_only"]["accuracy"]]
    }
    for cat, r in RESULT["per_category"].items():
        expected[cat] = [r["accuracy"]] + [b["per_category"][cat]["accuracy"] for b in base.values()]
    assert set(rows) == set(expected)
    for name, values in expected.items():
        # The table prints percentages with one decimal: at most 0.05 points off, plus float noise.
        assert rows[name] == pytest.approx([100 * v for v in values], abs=0.05 + 1e-9), name


@pytest.mark.parametrize(
    "remove, section, note",
    [
        ("data", "curation", "No curation report"),
        ("eval", "evaluation", "No evaluation result"),
        ("demo_timings.json", "timings", "No step timings"),
        ("sft/export", "training", "sft has no export: it has not finished"),
        ("*/metrics.jsonl", "training", "No training stage"),
        ("*/config.json", "configs", None),
    ],
)
def test_missing_inputs_give_a_note_in_their_section(tmp_path, remove, section, note):
    run = make_run(tmp_path)
    for path in run.glob(remove):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if remove == "demo_timings.json":  # the summary keeps a copy of the timings: a pre-timings run
        summary = json.loads((run / "demo_summary.json").read_text())
        (run / "demo_summary.json").write_text(json.dumps(summary | {"timings_s": {"total": 0.0}}))
    page = Page(write_report(run).read_text())
    assert list(page.sections) == SECTION_IDS
    if note is not None:
        assert note in page.sections[section]["text"]
    else:  # the curation config is still there; the stages' are left out
        assert len(page.sections[section]["pre"]) == 1


def test_an_empty_or_interrupted_run_still_gives_every_section(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert list(Page(text).sections) == SECTION_IDS
    assert text.count('class="missing"') >= 4
    # A stage killed mid-write: its last metrics line is cut short.
    run = make_run(tmp_path)
    with open(run / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "ce_lo')
    page = Page(write_report(run).read_text())
    assert "is not valid JSON lines" in page.sections["training"]["text"]


def test_stages_follow_the_demo_pipelines_whatever_their_names():
    found = {"sft", "stage2", "stage0", "stage1"}
    assert stage_order(found, None) == ["stage0", "stage1", "stage2", "sft"]
    assert stage_order(found | {"extra"}, "eve2") == ["stage0", "stage1", "stage2", "sft", "extra"]
    assert stage_order({"sft", "stage1", "stage2"}, "eve") == ["stage1", "stage2", "sft"]


@pytest.mark.slow
def test_every_section_is_visible_in_a_headless_browser(tmp_path):
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = write_report(make_run(tmp_path))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(out).as_uri())
        for sid in SECTION_IDS:
            assert driver.find_element(By.ID, sid).is_displayed(), sid
        # The browser decoded every embedded image (a broken one has naturalWidth 0).
        widths = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
    finally:
        driver.quit()
