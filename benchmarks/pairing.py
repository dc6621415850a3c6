"""Paired comparisons for benchmarks on a noisy machine (bench_server.py,
bench_ratelimit.py): a running order that changes from round to round, and the median of
the per-round ratios of two contenders measured in the same round."""

from __future__ import annotations

import statistics
from typing import TypeVar

T = TypeVar("T")


def order(cycle: list[T], number: int) -> list[T]:
    """Round ``number``'s running order: ``cycle`` rotated by one place a round, backwards
    every other cycle of rotations (over two cycles, each pair runs each way equally
    often)."""
    start = number % len(cycle)
    rotated = cycle[start:] + cycle[:start]
    return rotated[::-1] if (number // len(cycle)) % 2 else rotated


def paired(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """The median and quartiles of the per-round ratios numerator / denominator."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high
