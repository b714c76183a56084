"""Helpers for the tests of ``deploy/``: the PromQL expressions and the metric names it references.

:func:`referenced_metrics` is the list that a test of the daemons compares with what they export: every
metric name used by a Grafana dashboard (``deploy/grafana/dashboards/*.json``) or a Prometheus rule
(``deploy/prometheus/rules/*.yml``), as written there. Histogram series keep their suffix
(``caracal_gateway_request_duration_seconds_bucket``), as in the text exposition format; use
:func:`metric_family` to map one to its family. Names that recording rules define (``caracal:...``) are
not metrics a daemon exports and are left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
RULES = DEPLOY / "prometheus" / "rules"

#: Metrics that are not Caracal's own but are fine to reference: Prometheus's ``up`` and the process and
#: Python collectors of prometheus-client.
STANDARD_PREFIXES = ("process_", "python_")
STANDARD_NAMES = frozenset({"up"})

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and where it was found."""

    expr: str
    source: str


def _strip_braces(text: str) -> str:
    """Remove label matchers ``{...}`` and ranges/subqueries ``[...]`` (strings are gone already)."""
    out: list[str] = []
    depth = {"{": 0, "[": 0}
    closing = {"}": "{", "]": "["}
    for char in text:
        if char in depth:
            depth[char] += 1
            out.append(" ")
        elif char in closing and depth[closing[char]]:
            depth[closing[char]] -= 1
            out.append(" ")
        elif any(depth.values()):
            continue
        else:
            out.append(char)
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed, e.g. ``$__rate_interval``).

    ``{__name__="x"}`` selectors are not resolved; Caracal's files do not use them.
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _strip_braces(text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call:  # a function or an aggregation: sum(...), rate(...)
            continue
        if name.lower() in _KEYWORDS or name in _AGGREGATIONS:
            continue
        names.add(name)
    return names


def dashboard_expressions(directory: Path = DASHBOARDS) -> Iterator[Expression]:
    """Every ``expr`` in every panel target and query variable of the dashboards."""
    for path in sorted(directory.glob("*.json")):
        board = json.loads(path.read_text())
        source = str(path.relative_to(ROOT))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield Expression(target["expr"], f"{source}: {panel.get('title')}")
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            if variable.get("type") == "query" and text:
                yield Expression(_label_values_selector(text), f"{source}: variable {variable['name']}")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        nested = panel.get("panels")
        if isinstance(nested, list):
            yield from _panels(nested)


def _label_values_selector(query: str) -> str:
    """``label_values(metric{...}, label)`` -> ``metric{...}``; anything else is taken as PromQL."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    return match.group(1) if match else query


def rule_expressions(directory: Path = RULES) -> Iterator[Expression]:
    """Every ``expr`` of every alerting and recording rule (test files excluded)."""
    for path in sorted(directory.glob("*.yml")):
        if path.name.endswith(".test.yml"):
            continue
        source = str(path.relative_to(ROOT))
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert") or rule.get("record")
                yield Expression(str(rule["expr"]), f"{source}: {name}")


def recorded_names(directory: Path = RULES) -> set[str]:
    """The names recording rules define."""
    names: set[str] = set()
    for path in sorted(directory.glob("*.yml")):
        if path.name.endswith(".test.yml"):
            continue
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            names.update(rule["record"] for rule in group.get("rules", []) if "record" in rule)
    return names


def all_expressions() -> list[Expression]:
    return [*dashboard_expressions(), *rule_expressions()]


def metric_references() -> dict[str, set[str]]:
    """Metric name -> the places (file: panel or rule) that use it."""
    recorded = recorded_names()
    references: dict[str, set[str]] = {}
    for expression in all_expressions():
        for name in metric_names(expression.expr) - recorded:
            references.setdefault(name, set()).add(expression.source)
    return references


def referenced_metrics() -> set[str]:
    """Every metric name ``deploy/`` references (dashboards and rules), as written there."""
    return set(metric_references())


def metric_family(name: str) -> str:
    """The family of a sample name: ``x_bucket``/``x_sum``/``x_count`` -> ``x``; others unchanged."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def is_standard_metric(name: str) -> bool:
    return name in STANDARD_NAMES or name.startswith(STANDARD_PREFIXES)
