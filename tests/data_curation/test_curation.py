"""Curation pipeline: K-means, selection, caption filters, bad images, resume and rank invariance."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation.captions import caption_problem, is_repetitive, is_unfinished
from data_curation.cluster import assign, kmeans
from data_curation.common import read_jsonl
from data_curation.config import CaptionConfig, EmbeddedConfig, load_config, parse_step_args
from data_curation.embedded import (
    CHECK_PREFIXES,
    COLORS,
    SHAPES,
    attribute_checks,
    attributes_from_questions,
    caption_for,
)
from data_curation.selection import select_nearest
from eve.config_loader import ConfigError

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- K-means and selection


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_recovers_separated_blobs(backend):
    """5 Gaussian blobs 20 sigma apart in 16-d: the clustering equals the generating labels."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 20.0
    truth = np.repeat(np.arange(5), 200)
    x = (centres[truth] + rng.normal(size=(1000, 16))).astype(np.float32)
    # Lloyd from random points can merge two blobs (a local optimum, not a bug): start one per blob.
    init = x[[np.flatnonzero(truth == c)[0] for c in range(5)]]
    centroids = kmeans(x, 5, 10, seed=0, backend=backend, init=init)
    labels, _ = assign(x, centroids)
    assert adjusted_rand_score(truth, labels) == 1.0
    np.testing.assert_allclose(np.sort(centroids, 0), np.sort(centres, 0), atol=0.3)  # ~ 4 sigma/sqrt(200)


def test_kmeans_is_deterministic_for_a_seed():
    """Same seed, same centroids (FAISS samples and initialises from the seed)."""
    x = np.random.default_rng(1).normal(size=(2000, 8)).astype(np.float32)
    a = kmeans(x, 10, 5, seed=7, max_points_per_centroid=50)
    b = kmeans(x, 10, 5, seed=7, max_points_per_centroid=50)
    np.testing.assert_array_equal(a, b)


def test_selection_matches_brute_force():
    """The n nearest members per centre, checked against a float64 numpy brute force."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    # Uneven clusters: some centres sit far from the data, so they get fewer than n members.
    centroids = np.concatenate([x[:6], rng.normal(size=(3, 12)) * 4]).astype(np.float32)
    labels, dist = assign(x, centroids)
    d64 = np.sqrt(
        ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    )  # (N, k)
    np.testing.assert_array_equal(labels, d64.argmin(1))
    # float32 ||x||^2 - 2xc + ||c||^2 vs float64 direct: ~1e-6 relative on distances of order 5.
    np.testing.assert_allclose(dist, d64.min(1), rtol=1e-4, atol=1e-4)
    n = 40
    sel = select_nearest(labels, dist, n)
    assert len(sel) == len(set(sel.tolist()))  # no image twice
    sizes = np.bincount(labels, minlength=len(centroids))
    assert (sizes < n).any() and (sizes > n).any()  # both regimes are exercised
    expected = set()
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        expected |= set(members[np.argsort(d64[members, c], kind="stable")[:n]].tolist())
    assert set(sel.tolist()) == expected
    assert len(sel) == int(np.minimum(sizes, n).sum())


# ---------------------------------------------------------------- captions and config


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("A blue circle.", None),
        ("A photo of an astronaut.", None),
        ('He said "hello there."', None),
        ("A man in a red shirt and a man in a red shirt and a man in a red shirt.", "caption_repetitive"),
        ("A dog dog dog dog.", "caption_repetitive"),
        ("A man riding a horse on the beach with a", "caption_unfinished"),
        ("A man riding a horse on the", "caption_unfinished"),
        ("A cat sitting on the.", "caption_unfinished"),
        ("A cat sitting and...", "caption_unfinished"),
        ("Cat.", "caption_unfinished"),
        ("", "no_caption"),
        (None, "no_caption"),
    ],
)
def test_caption_filters(caption, reason):
    """Hand-labelled captions: repetitive, cut mid-sentence, missing, fine."""
    assert caption_problem(caption, CaptionConfig()) == reason


def test_caption_filter_thresholds():
    """Two repeats of a 3-gram are allowed by default, three are not; runs of 3 words allowed, 4 not."""
    assert not is_repetitive("a red car and a red car.")
    assert is_repetitive("a red car, a red car, a red car.")
    assert not is_repetitive("very very very big.")
    assert is_repetitive("very very very very big.")
    assert is_unfinished("Big") and not is_unfinished("Big dog!")


def test_easy_vqa_attributes_from_questions():
    """Colour and shape follow from open answers and from negated yes/no questions."""
    qa = [("what is the blue shape?", "rectangle"), ("is there a red shape?", "no")]
    assert attributes_from_questions(qa) == ("blue", "rectangle")
    qa = [("is there not a triangle?", "yes"), ("does the image not contain a circle?", "yes")]
    assert attributes_from_questions(qa) == (None, "rectangle")
    assert caption_for("blue", "circle") == "A blue circle." and caption_for(None, "circle") == "A circle."


def split_check(check: str) -> tuple[str, str, str]:
    """("is there a", "red", "yes") from "is there a red yes"."""
    *prefix, named, verdict = check.split()
    return " ".join(prefix), named, verdict


def test_attribute_checks():
    """Each check is a non-negated easy-vqa question start, an attribute of its kind and whether the
    image has it; about half of them name the image's own attribute; seeded; an unknown attribute gets
    no check."""
    import random

    rng = random.Random(0)
    same, prefixes = 0, set()
    for k in range(400):
        colour, shape = COLORS[k % 8], SHAPES[k % 3]
        text = attribute_checks(colour, shape, rng)
        assert text.endswith(".")
        (c_prefix, c_word, c_verdict), (s_prefix, s_word, s_verdict) = map(split_check, text[:-1].split(", "))
        assert c_word in COLORS and s_word in SHAPES
        assert c_verdict == ("yes" if c_word == colour else "no")
        assert s_verdict == ("yes" if s_word == shape else "no")
        same += (c_verdict == "yes") + (s_verdict == "yes")
        prefixes |= {c_prefix, s_prefix}
    assert 340 < same < 460  # 800 checks, p = 1/2: mean 400, sd 14
    assert prefixes == {"is there a", "is a", "does the image contain a"} == set(CHECK_PREFIXES)
    assert attribute_checks("red", "circle", random.Random(1)) == attribute_checks(
        "red", "circle", random.Random(1)
    )
    assert attribute_checks(None, None, rng) == ""
    assert split_check(attribute_checks(None, "circle", rng)[:-1])[1] in SHAPES


def test_several_attribute_checks_name_different_values_until_the_own_one():
    """With three checks per attribute the named values of one attribute differ; every check before the
    first "yes" names the image's own value with odds 1/2 (so the first check is "yes" about half the
    time), and the checks after it are all "no"."""
    import random

    rng = random.Random(0)
    first_yes, n = 0, 300
    for k in range(n):
        colour, shape = COLORS[k % 8], SHAPES[k % 3]
        checks = [
            split_check(c) for c in attribute_checks(colour, shape, rng, per_attribute=3)[:-1].split(", ")
        ]
        colours, shapes = checks[:3], checks[3:]
        assert [w in COLORS for _, w, _ in colours] == [True] * 3 and all(w in SHAPES for _, w, _ in shapes)
        for group, own in ((colours, colour), (shapes, shape)):
            words = [w for _, w, _ in group]
            assert len(set(words)) == len(words)  # no value named twice
            assert [v for _, w, v in group] == ["yes" if w == own else "no" for w in words]
        first_yes += colours[0][2] == "yes"
    assert 120 < first_yes < 180  # p = 1/2 over 300: mean 150, sd 8.7
    # Shapes have three values: the third check of a shape names the one value not named yet.
    assert {w for _, w, _ in shapes} == set(SHAPES)


def image_of(path: str) -> int:
    """The easy-vqa image id of ".../images/17.png"."""
    return int(path.rsplit("/", 1)[1].split(".")[0])


def test_embedded_build_writes_the_shipped_recipe(tmp_path):
    """Every easy-vqa caption starts with true checks, then the description; SFT conversations have
    `sft_turns` questions of one image, each followed by the short-answer instruction, no checks."""
    from data_curation.embedded import build, easy_vqa_attributes
    from eve.assets import easy_vqa_dir
    from eve.eval.benchmarks import SHORT_ANSWER_PROMPT

    counts = build(
        EmbeddedConfig(dir=str(tmp_path), sft_turns=3, sft_balanced=4, sft_plain_share=0.5), seed=0
    )
    attrs, _, _ = easy_vqa_attributes(easy_vqa_dir("train"))

    rows = [json.loads(line) for line in (tmp_path / "sources.jsonl").read_text().splitlines()]
    easy = [r for r in rows if r["source"] == "easy_vqa_train"]
    assert len(easy) == counts["easy_vqa_train"] and len(rows) == counts["sources"]
    for r in easy[:500]:
        checks, caption = r["caption"].split(". ", 1)
        image = image_of(r["image"])
        for prefix, named, verdict in map(split_check, checks.split(", ")):
            assert prefix in CHECK_PREFIXES, checks
            assert verdict == ("yes" if named in attrs[image] else "no"), (checks, attrs[image])
        assert caption == caption_for(*attrs[image])
    sft = json.loads((tmp_path / "sft_easy_vqa.json").read_text())
    assert len(sft) == counts["sft_samples"]
    assert all(len(s["conversations"]) <= 6 for s in sft)  # 3 turns
    assert sum(map(len, (s["conversations"] for s in sft))) == 2 * counts["sft_questions"]
    assert all(s["conversations"][0]["value"].startswith("<image>\n") for s in sft)
    assert not any(" yes," in t["value"] for s in sft for t in s["conversations"])
    # Each turn: a question, bare or followed by the instruction, about half of them bare.
    turns = defaultdict(Counter)  # image -> Counter of (question, answer)
    bare = 0
    for s in sft:
        for human, gpt in zip(s["conversations"][::2], s["conversations"][1::2]):
            q = human["value"].removeprefix("<image>\n")
            if q.endswith(f"\n{SHORT_ANSWER_PROMPT}"):
                q = q.removesuffix(f"\n{SHORT_ANSWER_PROMPT}")
            else:
                bare += 1
            assert q.endswith("?") and "\n" not in q, q
            turns[image_of(s["image"])][(q, gpt["value"])] += 1
    n_turns = sum(c.total() for c in turns.values())
    assert 0.48 < bare / n_turns < 0.52 and bare == counts["sft_plain_questions"]
    # Every easy-vqa train question is there once; the 4 extra ones per image are yes/no questions
    # in forms of the train split, right about the image, and name its own attribute half the time.
    real = defaultdict(Counter)
    for q, a, i in json.loads((easy_vqa_dir("train") / "questions.json").read_text()):
        real[int(i)][(q, a)] += 1
    forms = {
        " ".join("{}" if w in COLORS + SHAPES else w for w in q[:-1].split())
        for c in real.values()
        for q, _ in c
    }
    own = 0
    for image, got in turns.items():
        extra = got - real[image]
        assert sum(extra.values()) == 4 and not real[image] - got
        for q, a in extra.elements():
            words = q[:-1].split()
            named = [w for w in words if w in COLORS + SHAPES]
            assert " ".join("{}" if w in named else w for w in words) in forms and len(named) == 1
            negated = "not" in words or "no" in words
            assert a == ("yes" if (named[0] in attrs[image]) != negated else "no"), (q, a, attrs[image])
            own += named[0] in attrs[image]
    assert 0.47 < own / (4 * len(turns)) < 0.53


def test_configs_load_and_override():
    """Both shipped configs parse into typed dataclasses; dotted overrides convert types; typos fail."""
    cfg, _ = parse_step_args(
        [
            "--config",
            str(REPO / "configs/curation/laion.yaml"),
            "cluster.k=10",
            "--embed.batch_size",
            "8",
            "--captions.clip_model=null",
        ]
    )
    assert (cfg.cluster.k, cfg.embed.batch_size, cfg.select.per_cluster, cfg.filter.min_side) == (
        10,
        8,
        300,
        448,
    )
    assert cfg.captions.clip_model is None and cfg.embed.model.startswith("EVA")
    emb = load_config(REPO / "configs/curation/embedded.yaml")
    assert emb.embed.backend == "timm" and emb.cluster.k * emb.select.per_cluster >= 4000
    assert emb.embedded == EmbeddedConfig(enabled=True, dir="runs/demo/data", sft_turns=3)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'cluster\.kk'"):
        load_config(None, [("cluster.kk", 3)])
    with pytest.raises(ConfigError, match=r"'cluster\.k' must be an integer"):
        parse_step_args(["--cluster.k", "abc"])


def test_help_lists_every_setting(capsys):
    """`python -m data_curation.run --help`: one line per setting with its docstring, then exit 0."""
    with pytest.raises(SystemExit) as e:
        parse_step_args(["--help"], flags=("steps",))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "[--steps VALUE]" in out
    for line in (
        "--embedded.sft_turns (int, default 3): Questions of one easy-vqa image per SFT conversation",
        "--sources.N.path (str, default ''): Where the source lives (see `type`).",
        "--cluster.k (int, default 50000): Number of clusters (EVE on LAION: 50,000).",
        "--seed (int, default 0): Seed of everything random (clustering, shuffling).",
    ):
        assert line in out


# ---------------------------------------------------------------- the pipeline on real, bad and odd files


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_sources(root: Path) -> dict:
    """A folder, a webdataset tar and a JSONL list of real easy-vqa images plus broken / odd files."""
    from eve.assets import easy_vqa_dir

    imgs = easy_vqa_dir("train") / "images"
    folder = root / "folder"
    folder.mkdir(parents=True)
    for i in range(24):
        shutil.copy(imgs / f"{i}.png", folder / f"{i}.png")
        if i != 5:  # image 5 has no caption: dropped as no_caption
            (folder / f"{i}.txt").write_text(f"A picture number {i}.")
    shutil.copy(imgs / "0.png", folder / "dup_of_0.png")  # exact duplicate
    (folder / "dup_of_0.txt").write_text("A duplicate.")
    with tarfile.open(root / "part-0.tar", "w") as tf:
        for i in range(24, 40):
            for name, data in (
                (f"s{i}.png", (imgs / f"{i}.png").read_bytes()),
                (f"s{i}.txt", f"Tar image {i}.".encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    odd = root / "odd"
    odd.mkdir()
    base = Image.open(imgs / "40.png").convert("RGB")
    base.convert("L").save(odd / "grey.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(odd / "rgba.png")
    base.convert("P").save(odd / "palette.png")
    base.convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(odd / "i16.png")
    base.resize((8, 8)).save(odd / "tiny.png")
    (odd / "corrupt.png").write_bytes(b"\x89PNG not really an image" * 20)
    full = _png(Image.open(imgs / "41.png").convert("RGB"))
    (odd / "truncated.png").write_bytes(full[: len(full) // 2])
    names = [
        "grey.png",
        "rgba.png",
        "palette.png",
        "cmyk.jpg",
        "i16.png",
        "tiny.png",
        "corrupt.png",
        "truncated.png",
        "missing.png",
    ]
    with open(root / "odd.jsonl", "w") as f:
        for n in names:
            f.write(json.dumps({"image": f"odd/{n}", "caption": f"An odd image {n.split('.')[0]}."}) + "\n")
    return {"n_images": 25 + 16 + len(names)}


def overrides(src: Path, out: Path) -> list[str]:
    """A tiny, fast config: real efficientnet-lite0 at 32 px, 6 clusters x 6 images."""
    sources = json.dumps(
        [
            {"type": "folder", "path": str(src / "folder"), "name": "folder"},
            {"type": "wds", "path": str(src / "part-0.tar"), "name": "tars"},
            {"type": "jsonl", "path": str(src / "odd.jsonl"), "name": "odd"},
        ]
    )
    return [
        f"--out_dir={out}", f"--sources={sources}", "--scan.shard_size=8", "--filter.min_side=16",
        "--filter.num_workers=0", "--embed.backend=timm", "--embed.model=efficientnet_lite0",
        "--embed.weights=asset:efficientnet_lite0", "--embed.image_size=32", "--embed.batch_size=4",
        "--embed.num_workers=0", "--cluster.k=6", "--cluster.iterations=10", "--select.per_cluster=6",
        "--captions.part_size=10", "--shard.samples_per_shard=10", "--barrier_timeout_s=120",
    ]  # fmt: skip


def run_subprocess(src: Path, out: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m data_curation.run` in a fresh process (one thread, like the in-process reference)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "data_curation.run", *overrides(src, out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def output_digest(out: Path) -> dict[str, str]:
    """SHA-1 of every output tar, the manifest and the centroids."""
    files = sorted((out / "shards").glob("*.tar")) + [
        out / "shards" / "manifest.jsonl",
        out / "cluster" / "centroids.npy",
    ]
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-rank run (in process, one thread)."""
    from data_curation import run

    root = tmp_path_factory.mktemp("curation")
    info = make_sources(root / "src")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run.main(overrides(root / "src", root / "ref"))
    finally:
        torch.set_num_threads(threads)
    return root, info


def test_bad_and_odd_images_are_counted_and_converted(reference):
    """Missing, corrupt, truncated, tiny files and duplicates are counted; L/RGBA/P/CMYK/I;16 convert."""
    root, info = reference
    report = json.loads((root / "ref" / "report" / "report.json").read_text())
    c = report["counts"]
    assert c["scanned"] == info["n_images"]
    assert (
        c["dropped_missing"],
        c["dropped_decode_error"],
        c["dropped_too_small"],
        c["dropped_duplicate"],
    ) == (1, 2, 1, 1)
    assert c["dropped_no_caption"] == 1
    # L, RGBA, P, CMYK and I;16 files all pass the decode check (converted to RGB on the way).
    status = {
        r["key"].split("/")[-1]: r
        for p in sorted((root / "ref" / "filter").glob("*.jsonl"))
        for r in read_jsonl(p)
    }
    for name, mode in (("grey", "L"), ("rgba", "RGBA"), ("palette", "P"), ("cmyk", "CMYK"), ("i16", "I;16")):
        assert (status[name]["status"], status[name]["mode"]) == ("ok", mode)
    assert c["converted_mode"] >= 5
    manifest = read_jsonl(root / "ref" / "shards" / "manifest.jsonl")
    assert c["written"] == len(manifest) == c["selected"] - c["dropped_no_caption"]
    for name in ("cluster_sizes.png", "montage.png"):
        assert Image.open(root / "ref" / "report" / name).size[0] > 100


def test_shards_readable_by_webdataset_and_match_manifest(reference):
    """webdataset reads every sample; keys, captions and metadata equal the manifest's."""
    import webdataset as wds

    root, _ = reference
    out = root / "ref" / "shards"
    manifest = {m["key"]: m for m in read_jsonl(out / "manifest.jsonl")}
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    assert len(urls) == (len(manifest) + 9) // 10
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        m = manifest[s["__key__"]]
        meta = json.loads(s["json"])
        assert s["txt"].decode() == m["caption"]
        assert (meta["source_key"], meta["cluster"], meta["distance"]) == (
            m["source_key"],
            m["cluster"],
            m["distance"],
        )
        img = Image.open(io.BytesIO(s[m["ext"]]))
        img.load()
        assert img.mode in ("RGB", "L")
        seen += 1
    assert seen == len(manifest)
    clusters = [m["cluster"] for m in manifest.values()]
    assert max(np.bincount(clusters)) <= 6  # n per cluster


def test_resume_after_sigkill_gives_identical_output(reference):
    """SIGKILL after the first filtered (and embedded) input shard, re-run: the same bytes as the uninterrupted run."""
    root, _ = reference
    out = root / "killed"
    first = run_subprocess(root / "src", out, {"EVE_CURATION_KILL_AFTER_SHARDS": "1"})
    assert first.returncode == -9, first.stderr[-2000:]
    assert len(list((out / "filter").glob("shard-*.jsonl"))) == 1 and not (out / "embed").exists()
    second = run_subprocess(root / "src", out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert output_digest(out) == output_digest(root / "ref")
    assert not list(out.rglob(".*.tmp-*"))  # no temporary file left behind


def test_rerun_with_changed_sources_is_an_error_not_stale_shards(reference, tmp_path):
    """A finished scan is reused only for the same sources: rewriting a JSONL list (new captions)
    and re-running into the same out_dir fails with a clear error instead of keeping old shards."""
    from data_curation.run import run

    root, _ = reference
    src = tmp_path / "src"
    shutil.copytree(root / "src", src)
    cfg, _ = parse_step_args(overrides(src, tmp_path / "out"))
    run(cfg, ["scan"])
    first = (tmp_path / "out" / "scan" / "_SUCCESS.json").read_bytes()
    run(cfg, ["scan"])  # same sources: a no-op
    assert (tmp_path / "out" / "scan" / "_SUCCESS.json").read_bytes() == first
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # the same sources named by relative paths (make curate) rather than absolute ones (make demo)
        run(parse_step_args(overrides(Path("src"), tmp_path / "out"))[0], ["scan"])
    finally:
        os.chdir(cwd)
    jsonl = src / "odd.jsonl"
    jsonl.write_text(jsonl.read_text().replace('"caption": "', '"caption": "New: ', 1))
    with pytest.raises(ValueError, match="sources changed since"):
        run(cfg, ["scan"])


def test_two_ranks_give_the_same_output_as_one(reference):
    """Two real processes with RANK/WORLD_SIZE split the input shards, the caption parts and the output
    shards; the tars (keys, captions, image bytes, metadata) and the manifest are byte-identical to
    one rank's."""
    root, _ = reference
    out = root / "ranks"
    env = {"WORLD_SIZE": "2"}
    p1 = subprocess.Popen(
        [sys.executable, "-m", "data_curation.run", *overrides(root / "src", out)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env, "RANK": "1"},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    r0 = run_subprocess(root / "src", out, {**env, "RANK": "0"})
    _, err1 = p1.communicate(timeout=300)
    assert r0.returncode == 0 and p1.returncode == 0, (r0.stderr[-2000:], err1[-2000:])
    timings = {p.name: json.loads(p.read_text()) for p in (out / "report" / "timings").glob("*.rank1.json")}
    for step in ("filter", "embed", "captions", "shard"):  # rank 1 did its share of each
        assert timings[f"{step}.rank1.json"]["images"] > 0, step
    assert output_digest(out) == output_digest(root / "ref")


@pytest.mark.slow
def test_open_clip_backend_and_similarity_filter(tmp_path):
    """open_clip by name with random weights: L2-normalised features; the similarity filter scores pairs."""
    from data_curation.captions import clip_similarity
    from data_curation.common import Record
    from data_curation.config import EmbedConfig
    from data_curation.embed import build_extractor
    from eve.assets import skimage_photo

    ext, size = build_extractor(
        EmbedConfig(backend="open_clip", model="ViT-B-32", weights=None, precision="fp32"),
        torch.device("cpu"),
    )
    assert size == 224
    feats = ext(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))  # fp32 norm of a unit vector: ~1e-7
    recs = [Record(key=n, source="s", path=str(skimage_photo(n))) for n in ("astronaut.png", "coffee.png")]
    sims = clip_similarity(
        recs, ["A photo of an astronaut.", "A cup of coffee."], CaptionConfig(clip_model="ViT-B-32")
    )
    assert sims.shape == (2,) and np.all(np.abs(sims) <= 1.0 + 1e-5)


def test_resolution_filter_keeps_only_images_larger_than_min_side(tmp_path):
    """EVE keeps images larger than 448 x 448: a 448 px short side is dropped, 449 px is kept."""
    from PIL import Image

    from data_curation.common import Record
    from data_curation.filter import check_image

    statuses = {}
    for size in [(448, 600), (449, 449), (600, 448)]:
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (10, 20, 30)).save(path)
        statuses[size] = check_image(Record(key=path.stem, source="t", path=str(path)), 448)[0]["status"]
    assert statuses == {(448, 600): "too_small", (449, 449): "ok", (600, 448): "too_small"}


def test_override_reaches_a_list_item():
    """`sources.0.path=...` changes the first source of the shipped config; a bad index is an error."""
    cfg = load_config(
        REPO / "configs/curation/embedded.yaml", [("sources.0.path", "/elsewhere/sources.jsonl")]
    )
    assert cfg.sources[0].path == "/elsewhere/sources.jsonl" and cfg.sources[0].type == "jsonl"
    with pytest.raises(ConfigError, match="'sources.5': '5' is not an index of the 1-item list"):
        load_config(REPO / "configs/curation/embedded.yaml", [("sources.5.path", "x")])


def tiny_folder(root: Path, captions: list[str], side: int) -> Path:
    """A folder source of len(captions) distinct one-colour side x side PNGs with their captions."""
    folder = root / "folder"
    folder.mkdir(parents=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (side, side), (40 * i, 255 - 40 * i, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def tiny_overrides(folder: Path, out: Path, min_side: int) -> list[str]:
    """One folder source, random efficientnet-lite0 at 32 px, 2 clusters."""
    sources = json.dumps([{"type": "folder", "path": str(folder), "name": "folder"}])
    return [
        f"--out_dir={out}", f"--sources={sources}", f"--filter.min_side={min_side}",
        "--filter.num_workers=0", "--embed.backend=timm", "--embed.model=efficientnet_lite0",
        "--embed.image_size=32", "--embed.num_workers=0", "--cluster.k=2", "--cluster.iterations=2",
        "--barrier_timeout_s=60",
    ]  # fmt: skip


def test_curation_that_keeps_nothing_fails_naming_the_step(tmp_path):
    """A size filter that drops every image: `python -m data_curation.run` exits non-zero with a message
    naming the filter step and the counts by reason, and writes no shards."""
    folder = tiny_folder(tmp_path / "src", ["A red square.", "A green square.", "A blue square."], 20)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "data_curation.run", *tiny_overrides(folder, out, 448)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "the filter step dropped every image" in proc.stderr, proc.stderr[-2000:]
    assert "3 scanned" in proc.stderr and "too_small: 3" in proc.stderr
    assert "filter.min_side" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "shards").exists()


def test_captions_that_drop_everything_fail_naming_the_step(tmp_path):
    """Every caption filtered out (too short): an error naming the captions step and its reasons."""
    from data_curation.common import NothingKeptError
    from data_curation.run import run

    folder = tiny_folder(tmp_path / "src", ["Cat.", "Dog", ""], 40)
    cfg, _ = parse_step_args(tiny_overrides(folder, tmp_path / "out", 16))
    with pytest.raises(NothingKeptError, match="the captions step dropped every image") as err:
        run(cfg)
    assert "caption_unfinished: 2" in str(err.value) and "no_caption: 1" in str(err.value)
    assert isinstance(err.value, ValueError) and not (tmp_path / "out" / "shards").exists()


# ---------------------------------------------------------------- decode once


def decode_once_sources(folder: Path) -> None:
    """Real easy-vqa PNGs plus JPEGs that DCT scaling shrinks (one EXIF-rotated, one truncated), a
    duplicate and an image below min_side."""
    from eve.assets import easy_vqa_dir

    imgs = easy_vqa_dir("train") / "images"
    folder.mkdir(parents=True)
    for i in range(14):
        shutil.copy(imgs / f"{i}.png", folder / f"{i:02d}.png")
    for i in range(14, 18):  # 200 x 300 JPEGs: decoded at 1/4 scale for a 32 px embed input
        Image.open(imgs / f"{i}.png").convert("RGB").resize((200, 300)).save(folder / f"{i}.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: a quarter turn, so the checked size is 300 x 200
    Image.open(imgs / "18.png").convert("RGB").resize((200, 300)).save(folder / "18.jpg", exif=exif)
    whole = (folder / "14.jpg").read_bytes()
    (folder / "19.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    shutil.copy(folder / "03.png", folder / "20.png")  # exact duplicate, in another input shard
    Image.open(imgs / "21.png").resize((10, 10)).save(folder / "21.png")  # too small


def test_filter_decodes_each_image_once_and_matches_decode_twice(tmp_path, monkeypatch):
    """The filter's one decode gives the same rows, kept keys and features as a straightforward
    reference that decodes every image twice (a full decode for the checks, then the embed input)."""
    from data_curation import embed, filter
    from data_curation.common import decode_image
    from data_curation.embed import build_extractor, feature_paths, load_square
    from data_curation.run import run

    decodes: Counter = Counter()

    def counting(data: bytes, where: str, draft_size: int | None = None):
        decodes[where] += 1
        return decode_image(data, where, draft_size)

    monkeypatch.setattr(filter, "decode_image", counting)
    monkeypatch.setattr(embed, "decode_image", counting)
    folder = tmp_path / "src"
    decode_once_sources(folder)
    cfg, _ = parse_step_args(
        [*tiny_overrides(folder, tmp_path / "out", 16), "--scan.shard_size=8", "--embed.batch_size=3",
         "--embed.weights=asset:efficientnet_lite0", "--embed.precision=fp32"]
    )  # fmt: skip
    run(cfg, ["scan", "filter", "embed"])
    files = sorted(folder.iterdir())
    assert decodes == Counter({str(p): 1 for p in files})  # every file once; the embed step decodes none

    # The reference: per input shard of 8 files, a full decode for the checks, dedup over shards,
    # then a second decode (DCT-scaled, as the embed step did) of the kept images, in batches of 3.
    ext, size = build_extractor(cfg.embed, torch.device("cpu"))
    seen, want_rows, want_keys, want_feats = set(), [], [], []
    for s in range(0, len(files), 8):
        rows, kept = [], []
        for p in files[s : s + 8]:
            row = {"key": f"folder/{p.stem}"}
            try:
                img, fmt, mode, converted, _ = decode_image(p.read_bytes(), str(p))
            except ValueError:
                rows.append({**row, "status": "decode_error"})
                continue
            sha1 = hashlib.sha1(p.read_bytes()).hexdigest()
            w, h = img.size
            status = "ok" if min(w, h) > 16 else "too_small"
            rows.append({**row, "status": status, "width": w, "height": h, "format": fmt, "mode": mode,
                         "converted": converted, "sha1": sha1})  # fmt: skip
            if status == "ok" and sha1 not in seen:
                kept.append(p)
            seen |= {sha1} if status == "ok" else set()
        want_rows.append(rows)
        want_keys += [f"folder/{p.stem}" for p in kept]
        for a in range(0, len(kept), 3):
            x = torch.stack([load_square(p.read_bytes(), str(p), size) for p in kept[a : a + 3]])
            want_feats.append(ext(x).numpy().astype(np.float16))
    got_rows = [
        read_jsonl(tmp_path / "out" / "filter" / f"shard-{i:05d}.jsonl") for i in range(len(want_rows))
    ]
    assert got_rows == want_rows
    by_key = {r["key"]: r for rows in got_rows for r in rows}
    assert (by_key["folder/18"]["width"], by_key["folder/18"]["height"]) == (300, 200)
    assert by_key["folder/19"]["status"] == "decode_error" and by_key["folder/21"]["status"] == "too_small"
    got_keys, got_feats = [], []
    for i in range(len(want_rows)):
        kp, fp = feature_paths(tmp_path / "out", i)
        got_keys += json.loads(kp.read_text())["keys"]
        got_feats.append(np.load(fp))
    assert got_keys == want_keys and "folder/20" not in got_keys  # the duplicate is not kept
    # fp32 features cached as fp16 (values below 1): the one pass embeds the duplicate as well, so one
    # batch holds other images than the reference's; a last-bit fp32 difference may round to the next
    # fp16 value, at most 2**-11 apart below 1.
    np.testing.assert_allclose(
        np.concatenate(got_feats).astype(np.float32),
        np.concatenate(want_feats).astype(np.float32),
        atol=2**-11,
    )
