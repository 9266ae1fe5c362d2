"""Promotion decisions and the served model's request parsing (no MLflow server needed)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.tracking.pyfunc_model import MAX_COUNT, parse_request
from components.tracking.registry import decide


def test_first_version_promotes():
    promote, reason = decide("fid", 12.5, None, 0.5)
    assert promote is True
    assert "first version" in reason and "12.5" in reason


def test_lower_by_more_than_margin_promotes():
    promote, reason = decide("fid", 8.25, 10.5, 0.5)
    assert promote is True
    assert "fid" in reason and "8.25" in reason and "10.5" in reason


def test_lower_by_less_than_margin_keeps():
    promote, reason = decide("fid", 10.25, 10.5, 0.5)
    assert promote is False
    assert "10.25" in reason and "10.5" in reason and "0.5" in reason


def test_higher_keeps():
    promote, reason = decide("kid", 0.031, 0.012, 0.0)
    assert promote is False
    assert "kid" in reason and "0.031" in reason and "0.012" in reason


def test_equal_with_zero_margin_keeps():
    assert decide("fid", 10.0, 10.0, 0.0)[0] is False
    assert decide("fid", 9.99, 10.0, 0.0)[0] is True


def test_nan_challenger_never_promotes():
    assert decide("fid", float("nan"), 10.0, 0.5)[0] is False


# --- parse_request ---------------------------------------------------------------------------------

def test_defaults():
    assert parse_request({}) == (16, 0, None)


def test_dict_request():
    assert parse_request({"count": 4, "seed": 7}) == (4, 7, None)
    assert parse_request({"count": 3, "seed": 0, "labels": [0, 1, 2]}) == (3, 0, [0, 1, 2])


def test_numpy_integers_accepted_and_returned_as_int():
    count, seed, labels = parse_request({"count": np.int64(2), "seed": np.int32(5), "labels": np.array([1, 2])})
    assert (count, seed, labels) == (2, 5, [1, 2])
    assert type(count) is int and type(seed) is int and all(type(v) is int for v in labels)


def test_one_row_dataframe():
    assert parse_request(pd.DataFrame({"count": [5], "seed": [9]})) == (5, 9, None)
    assert parse_request(pd.DataFrame({"count": [2], "labels": [[3, 4]]})) == (2, 0, [3, 4])


def test_dataframe_uses_first_row_and_empty_frame_means_defaults():
    assert parse_request(pd.DataFrame({"count": [5, 6], "seed": [1, 2]})) == (5, 1, None)
    assert parse_request(pd.DataFrame()) == (16, 0, None)


@pytest.mark.parametrize("count", [0, -1, MAX_COUNT + 1, 2.0, "4", None])
def test_bad_count(count):
    with pytest.raises(ValueError, match=r"^count: must be an integer in 1\.\.4096"):
        parse_request({"count": count})


def test_count_limits_inclusive():
    assert parse_request({"count": 1})[0] == 1
    assert parse_request({"count": MAX_COUNT})[0] == MAX_COUNT


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"^seed: must be an integer >= 0"):
        parse_request({"seed": seed})


def test_unknown_field_named():
    with pytest.raises(ValueError, match=r"unknown request field\(s\) \['temperature'\]"):
        parse_request({"count": 2, "temperature": 0.7})


def test_label_count_mismatch():
    with pytest.raises(ValueError, match=r"^labels: need one per image \(3\), got 2"):
        parse_request({"count": 3, "labels": [1, 2]})


def test_non_mapping_rejected():
    with pytest.raises(ValueError, match="request must be a mapping"):
        parse_request([{"count": 2}])


def test_bool_count_rejected():
    with pytest.raises(ValueError, match="count"):
        parse_request({"count": True})


def test_non_integer_labels_name_the_field():
    with pytest.raises(ValueError, match="labels"):
        parse_request({"count": 2, "labels": ["a", "b"]})
