"""Reading the CLI's human output in tests."""

from __future__ import annotations


def block(text: str) -> dict[str, str]:
    """The ``  Label: value`` lines of a runbook-style block, as a mapping."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  ") and ": " in line:
            label, _, value = line.strip().partition(": ")
            fields.setdefault(label, value)
    return fields
