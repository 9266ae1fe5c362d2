"""Which way each metric the registry may gate on improves: declared here once, and read by the
params' validation (registry.gating_metric), the gate's decision, its intervals, its rule text and
its bound for an unscorable champion (registry.ceiling: a ceiling for lower-is-better metrics, a
floor for higher-is-better ones).

Plain data and arithmetic: components.config imports it, so it imports nothing.
"""
from __future__ import annotations

from typing import Literal

LOWER, HIGHER = "lower", "higher"

# metric → the direction in which it is better
BETTER = {
    "fid": LOWER,
    "kid": LOWER,
    "psnr": HIGHER,       # dB, translate models (inside the mask for families that take one)
    "ssim": HIGHER,
    "psnr_gain": HIGHER,  # dB over the best classical baseline (bicubic, mean fill, …) of the same inputs
}
GatingMetric = Literal[tuple(BETTER)]

# A gating metric measured by another entry of evaluate.metrics (psnr gives psnr_gain beside itself).
MEASURED_BY = {"psnr_gain": "psnr"}


def measured_by(metric: str) -> str:
    """The evaluate.metrics entry whose scores hold `metric` (and its interval)."""
    return MEASURED_BY.get(metric, metric)


def direction(metric: str) -> str:
    """LOWER or HIGHER; a clear error for a metric the gate cannot judge."""
    try:
        return BETTER[metric]
    except KeyError:
        raise ValueError(f"registry.gating_metric: {metric!r} has no declared direction; "
                         f"gate on one of {', '.join(BETTER)}") from None


def beats(metric: str, value: float, other: float, margin: float) -> bool:
    """`value` is better than `other` by more than `margin` (in the metric's own units)."""
    return value < other - margin if direction(metric) == LOWER else value > other + margin


def intervals_apart(metric: str, challenger: tuple[float, float], champion: tuple[float, float]) -> bool:
    """The challenger's interval lies wholly on the better side of the champion's (touching is not
    apart): for lower-is-better its upper bound below the champion's lower bound, for
    higher-is-better its lower bound above the champion's upper bound."""
    if direction(metric) == LOWER:
        return challenger[1] < champion[0]
    return challenger[0] > champion[1]


def within_bound(metric: str, value: float, bound: float) -> bool:
    """`value` is no worse than `bound`: at most a ceiling (lower-is-better), at least a floor."""
    return value <= bound if direction(metric) == LOWER else value >= bound


def bound_name(metric: str) -> str:
    """What registry.ceiling.<metric> is for this metric: "ceiling" or "floor"."""
    return "ceiling" if direction(metric) == LOWER else "floor"
