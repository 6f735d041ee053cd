"""Fixtures shared by the model tests."""

import pytest

from tests.eve.test_modeling import image_sample


@pytest.fixture
def samples(tiny_config):
    """Three samples of 20, 8 and 9 tokens: tall image, text only, wide image (8 px per token)."""
    return [
        image_sample(tiny_config, [1, 319, 1967], (32, 16), [29871, 13, 450, 3303], seed=1),
        image_sample(tiny_config, [1, 910, 338, 263, 1243, 29889], None, [1728, 727]),
        image_sample(tiny_config, [1, 22172], (8, 24), [3303, 450], seed=2),
    ]
