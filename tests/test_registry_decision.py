"""Promotion decisions (no MLflow server needed); request parsing is in tests/test_requests.py."""
from __future__ import annotations

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
