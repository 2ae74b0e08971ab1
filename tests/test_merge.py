"""Merging classifier answers onto detected objects."""

from __future__ import annotations

import numpy as np
import pytest

from engines import Classifications, Detections
from serve_app.graph import merge


def _dets() -> Detections:
    return Detections(
        np.array([[1, 2, 3, 4], [10, 20, 30, 40], [5, 5, 9, 9]], np.float32),
        np.array([0.99, 0.9, 0.8], np.float32),
        np.zeros(3, np.int32),
        ("face",),
        np.zeros((3, 5, 2), np.float32),
    )


def test_each_classifier_lands_on_the_objects_it_was_given() -> None:
    gender = Classifications("softmax", np.array([1, 0], np.int32), np.array([0.8, 0.95], np.float32),
                             np.array([True, True]), None, ("female", "male"))
    age = Classifications("expected_value", np.array([3], np.int32), np.array([0.5], np.float32),
                          np.array([True]), np.array([31.234], np.float32))
    objects = merge(_dets(), {"gender": (np.array([0, 2]), gender), "age": (np.array([1]), age)})
    assert [o.attributes for o in objects] == [
        {"gender": {"label": "male", "score": 0.8}},
        {"age": {"value": 31.23}},
        {"gender": {"label": "female", "score": 0.95}},
    ]
    assert objects[1].box == [10.0, 20.0, 30.0, 40.0] and objects[1].label == "face"
    assert len(objects[0].landmarks) == 5


def test_below_threshold_results_are_left_out() -> None:
    result = Classifications("softmax", np.array([0], np.int32), np.array([0.3], np.float32),
                             np.array([False]), None, ("x",))
    objects = merge(_dets(), {"c": (np.array([1]), result)})
    assert [o.attributes for o in objects] == [{}, {}, {}]


def test_mismatched_counts_are_an_error_not_a_silent_shift() -> None:
    result = Classifications("softmax", np.zeros(1, np.int32), np.ones(1, np.float32), np.ones(1, bool), None, ("x",))
    with pytest.raises(ValueError, match="1 results for 2 objects"):
        merge(_dets(), {"c": (np.array([0, 1]), result)})
