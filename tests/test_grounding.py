"""The grounding measure: known answers for one-hot and uniform attention, and the crop geometry."""
from __future__ import annotations

import numpy as np
import pytest

from capkit.data.records import Box
from capkit.data.transforms import visible_region
from capkit.evaluation.grounding import GroundingMeter, box_coverage

NO_CROP = {"input_size": (3, 100, 100), "crop_pct": 1.0, "crop_mode": "center"}


def test_visible_region_follows_timms_centre_crop():
    # 112 px image, 224 crop at crop_pct 0.875: resized to 256, so 224/256 of each side stays, centred
    x0, y0, x1, y1 = visible_region(112, 112, {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center"})
    assert (x0, y0, x1, y1) == pytest.approx((7.0, 7.0, 105.0, 105.0))
    assert visible_region(80, 60, NO_CROP) == pytest.approx((10, 0, 70, 60))  # a square crop of the centre


def test_box_coverage_weights_cells_by_overlap():
    # a 4 x 4 grid over 100 x 100 px: cells are 25 px; the box covers cell (1, 1) and half of cell (1, 2)
    coverage = box_coverage([Box("red circle", 25, 25, 62.5, 50)], (0, 0, 100, 100), (4, 4)).reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[1, 1], expected[1, 2] = 1.0, 0.5
    assert np.allclose(coverage, expected)


def test_one_hot_attention_on_the_box_scores_one_and_uniform_scores_the_area_fraction():
    boxes = [Box("small red circle", 50, 25, 75, 50), Box("large blue square", 0, 50, 50, 100)]
    grid, size = (4, 4), (100, 100)
    one_hot = np.zeros((3, 16))
    one_hot[:, 1 * 4 + 2] = 1.0  # every step looks at cell (1, 2) = the red circle's box
    meter = GroundingMeter()
    meter.add(["a", "red", "circle"], one_hot, grid, boxes, size, NO_CROP)
    assert meter.result() == {"grounding": 1.0, "grounding_uniform": 1 / 16, "grounded_words": 2.0}

    uniform = GroundingMeter()
    uniform.add(["a", "blue", "square", "<end>"], np.full((4, 16), 1 / 16), grid, boxes, size, NO_CROP)
    result = uniform.result()
    assert result["grounding"] == pytest.approx(0.25)  # the square covers a quarter of the image
    assert result["grounding"] == pytest.approx(result["grounding_uniform"])


def test_size_words_and_absent_objects_are_not_scored():
    meter = GroundingMeter()
    meter.add(["small", "green", "triangle"], np.full((3, 4), 0.25), (2, 2), [Box("small red circle", 0, 0, 5, 5)],
              (10, 10), NO_CROP)
    assert meter.result()["grounded_words"] == 0.0
