"""The drills' one table: a row per measure, with its target, its same-run baseline and a verdict.

An *invariant* (no overspend, nothing lost, every tampering detected, ...) must hold on any machine: a broken
one makes ``bench/proof.py`` exit non-zero. A *target* (latency, throughput) depends on the machine: a miss
is shown, not fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum


class Verdict(StrEnum):
    HELD = "held"  # an invariant that held
    BROKEN = "BROKEN"  # an invariant that did not
    MET = "met"  # a target reached
    MISSED = "missed"  # a target not reached on this run
    INFO = "-"  # a figure without a target


@dataclass(frozen=True, slots=True)
class Row:
    drill: str
    measure: str
    value: str
    target: str = ""
    baseline: str = ""
    ratio: str = ""
    verdict: Verdict = Verdict.INFO

    @property
    def broken(self) -> bool:
        return self.verdict is Verdict.BROKEN


def invariant(drill: str, measure: str, value: object, holds: bool, target: str, **extra: str) -> Row:
    """A row for an invariant: ``holds`` decides HELD or BROKEN."""
    return Row(
        drill, measure, _text(value), target, verdict=Verdict.HELD if holds else Verdict.BROKEN, **extra
    )


def target(drill: str, measure: str, value: object, met: bool, target: str, **extra: str) -> Row:
    """A row for a performance target: ``met`` decides MET or MISSED."""
    return Row(drill, measure, _text(value), target, verdict=Verdict.MET if met else Verdict.MISSED, **extra)


def info(drill: str, measure: str, value: object, **extra: str) -> Row:
    return Row(drill, measure, _text(value), **extra)


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` to two decimals ('' when the baseline is zero)."""
    return f"{value / baseline:.2f}" if baseline else ""


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


HEADER = ("drill", "measure", "value", "target", "baseline (same run)", "ratio", "verdict")


def markdown(rows: Sequence[Row]) -> str:
    """The table as GitHub markdown (what docs/benchmarks.md keeps)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = (row.drill, row.measure, row.value, row.target, row.baseline, row.ratio, str(row.verdict))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_json(rows: Iterable[Row]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


def broken(rows: Iterable[Row]) -> list[Row]:
    return [row for row in rows if row.broken]
