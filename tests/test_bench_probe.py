"""bench/probe_easy_vqa.py's AUC against hand-computed values (the script itself needs a trained model)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def probe():
    path = Path(__file__).resolve().parents[1] / "bench" / "probe_easy_vqa.py"
    spec = importlib.util.spec_from_file_location("probe_easy_vqa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auc_by_hand(probe):
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right.
    assert probe.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    # A tie counts half; a perfect and a reversed order give 1 and 0.
    assert probe.auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert probe.auc(np.array([0.0, 2.0, 3.0]), np.array([False, True, True])) == 1.0
    assert probe.auc(np.array([0.0, 2.0, 3.0]), np.array([True, False, False])) == 0.0
