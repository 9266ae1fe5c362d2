"""Promotion decisions (no MLflow server needed); request parsing is in tests/test_requests.py."""
from __future__ import annotations

import math

import pytest

from components.tracking.registry import decide, interval

NAN = float("nan")


def gate(metric, value, champion_value, margin, new_ci=None, champion_ci=None):
    return decide(metric, value, champion_value, margin, new_ci=new_ci, champion_ci=champion_ci)


# --- point estimates: the margin alone ---------------------------------------------------------------

def test_first_version_promotes():
    promote, reason = gate("fid", 12.5, None, 0.5)
    assert promote is True
    assert "first version" in reason and "12.5" in reason


def test_lower_by_more_than_margin_promotes_and_says_margin_alone_decides():
    promote, reason = gate("fid", 8.25, 10.5, 0.5)
    assert promote is True
    assert "fid" in reason and "8.25" in reason and "10.5" in reason
    assert "no interval for the challenger and champion, margin alone decides" in reason


def test_lower_by_less_than_margin_keeps():
    promote, reason = gate("fid", 10.25, 10.5, 0.5)
    assert promote is False
    assert "10.25" in reason and "10.5" in reason and "margin 0.5" in reason


def test_higher_keeps_lower_is_better_for_kid_too():
    promote, reason = gate("kid", 0.031, 0.012, 0.0)
    assert promote is False
    assert "kid" in reason and "0.031" in reason and "0.012" in reason
    assert gate("kid", 0.012, 0.031, 0.0)[0] is True


def test_equal_with_zero_margin_keeps():
    assert gate("fid", 10.0, 10.0, 0.0)[0] is False
    assert gate("fid", 9.99, 10.0, 0.0)[0] is True


@pytest.mark.parametrize("value, champion", [(NAN, 10.0), (5.0, NAN), (math.inf, 10.0), (5.0, math.inf)])
def test_a_non_finite_score_on_either_side_never_promotes(value, champion):
    promote, reason = gate("fid", value, champion, 0.5, (4.0, 6.0), (9.0, 11.0))
    assert promote is False and "not both finite" in reason


# --- with intervals: beyond both, and by the margin --------------------------------------------------

def test_intervals_apart_and_beyond_the_margin_promote():
    promote, reason = gate("fid", 30.0, 40.0, 5.0, (28.0, 32.0), (38.0, 42.0))
    assert promote is True
    assert "intervals apart" in reason and "[28, 32]" in reason and "[38, 42]" in reason


def test_overlapping_intervals_keep_even_beyond_the_margin():
    promote, reason = gate("fid", 30.0, 40.0, 5.0, (25.0, 39.0), (35.0, 45.0))
    assert promote is False
    assert "intervals overlap or touch" in reason and "better by more than the margin 5" in reason


def test_touching_intervals_are_not_beyond():
    assert gate("fid", 30.0, 40.0, 5.0, (28.0, 35.0), (35.0, 45.0))[0] is False
    assert gate("fid", 30.0, 40.0, 5.0, (28.0, 34.999), (35.0, 45.0))[0] is True


def test_intervals_apart_but_within_the_margin_keep():
    promote, reason = gate("kid", 0.0100, 0.0110, 0.002, (0.0098, 0.0102), (0.0108, 0.0112))
    assert promote is False
    assert "intervals apart" in reason and "not better by more than the margin 0.002" in reason


def test_intervals_do_not_have_to_hold_the_point_estimate():
    # The gate reads the bounds only: an interval that misses its estimate is still compared as it is.
    assert gate("fid", 30.0, 40.0, 5.0, (31.0, 33.0), (41.0, 44.0))[0] is True


@pytest.mark.parametrize("champion_ci", [None, (NAN, 42.0), (42.0, 38.0)], ids=["absent", "nan", "reversed"])
def test_a_champion_without_a_usable_interval_falls_back_to_the_margin(champion_ci):
    promote, reason = gate("fid", 30.0, 40.0, 5.0, (25.0, 39.0), champion_ci)
    assert promote is True  # the intervals would overlap, but the champion has none to compare
    assert "no interval for the champion" in reason and "margin alone decides" in reason
    if champion_ci is not None:
        assert "not a finite low <= high" in reason


def test_a_challenger_without_interval_falls_back_to_the_margin():
    promote, reason = gate("fid", 38.0, 40.0, 5.0, None, (39.0, 41.0))
    assert promote is False and "no interval for the challenger, margin alone decides" in reason


# --- the gate walked over synthetic metric histories -------------------------------------------------

def champions_of(history: list[tuple[float, tuple[float, float] | None]], margin: float) -> list[int]:
    """Registers each (value, interval) in turn; the index of the champion after each registration."""
    champion, champions = None, []
    for i, (value, ci) in enumerate(history):
        current = None if champion is None else history[champion]
        promote, _ = gate("fid", value, None if current is None else current[0], margin,
                          ci, None if current is None else current[1])
        if promote:
            champion = i
        champions.append(champion)
    return champions


HISTORIES = {
    # name: (history of (fid, interval), margin, champion after each registration)
    "steady improvement": ([(100, (95, 105)), (80, (76, 84)), (60, (57, 63)), (40, (38, 42))], 5.0, [0, 1, 2, 3]),
    "noise around a plateau": ([(50, (45, 55)), (47, (42, 52)), (49, (44, 54)), (44, (40, 48))], 2.0, [0, 0, 0, 0]),
    "a lucky point estimate with a wide interval": ([(50, (48, 52)), (30, (10, 60)), (45, (44, 46.5))], 2.0, [0, 0, 2]),
    "old versions without intervals": ([(50, None), (47, (46, 48)), (44, None), (41, (40, 42))], 2.0, [0, 1, 2, 3]),
    "a NaN challenger in the middle": ([(50, (48, 52)), (NAN, (NAN, NAN)), (40, (39, 41))], 2.0, [0, 0, 2]),
}


@pytest.mark.parametrize("name", HISTORIES)
def test_histories(name):
    history, margin, expected = HISTORIES[name]
    assert champions_of(history, margin) == expected


def test_interval_reads_metrics_json_keys_and_is_absent_without_them():
    assert interval({"fid": 3.0, "fid_ci_low": 2.5, "fid_ci_high": "3.5"}, "fid") == (2.5, 3.5)  # tags are strings
    assert interval({"fid": 3.0, "kid_ci_low": 0.1, "kid_ci_high": 0.2}, "fid") is None
