"""Embedded assets: paths exist, missing packages are named, the tokenizer equals SentencePiece."""

import importlib.util
import json

import pytest
import sentencepiece as spm

from eve import assets


def test_asset_paths_exist():
    assert assets.mistral_tokenizer_path().stat().st_size > 100_000
    assert assets.smollm2_gguf_path().suffix == ".gguf"
    assert assets.efficientnet_lite0_weights_path().suffix == ".pth"
    for split in ("train", "test"):
        root = assets.easy_vqa_dir(split)
        assert (root / "questions.json").exists() and (root / "images" / "0.png").exists()
    assert len(assets.easy_vqa_answers_path().read_text().split()) == 13
    for name in assets.SKIMAGE_PHOTOS:
        assert assets.skimage_photo(name).exists()


def test_missing_package_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "easy_vqa" else real(name, *a)
    )
    with pytest.raises(assets.AssetNotFoundError, match=r"easy-vqa==1\.0"):
        assets.easy_vqa_dir("train")


def _corpus() -> list[str]:
    """Real questions plus text that exercises digits, unicode, byte fallback and repeated spaces."""
    questions = json.loads((assets.easy_vqa_dir("test") / "questions.json").read_text())
    return [q[0] for q in questions[:200]] + [
        "A chat between a curious user and an artificial intelligence assistant.",
        "USER: What is 12345 + 678? ASSISTANT: 13023",
        "naïve café — 東京 😀 \u00a0tabs\tand\nnewlines  double  spaces",
        "The quick brown fox jumps over the lazy dog!!!",
    ]


def test_default_tokenizer_matches_sentencepiece(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(assets.mistral_tokenizer_path()))
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token_id == 0  # unk as pad, like Vicuna
    for text in _corpus():
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text), text
    assert tokenizer("Hello").input_ids[0] == 1  # bos added


def test_tokenizer_round_trips_offline(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    also = assets.load_tokenizer(tmp_path / "saved")
    for text in _corpus()[-4:]:
        assert reloaded(text).input_ids == tokenizer(text).input_ids == also(text).input_ids
    assert reloaded.pad_token_id == 0

    # A Vicuna-style directory that only has tokenizer.model converts without protobuf.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tokenizer.model").write_bytes(assets.mistral_tokenizer_path().read_bytes())
    assert assets.load_tokenizer(slow)("Hi there").input_ids == tokenizer("Hi there").input_ids
