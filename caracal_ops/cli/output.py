"""Printing results: the runbook's labelled blocks, aligned tables, or JSON. Results go to stdout."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any
from uuid import UUID

import typer


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


FORMAT_OPTION = typer.Option(
    OutputFormat.TABLE, "--format", "-o", help="Output format.", case_sensitive=False
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(_plain(data), indent=2, ensure_ascii=False))


def emit_block(title: str, fields: Iterable[tuple[str, Any]]) -> None:
    """A heading and indented ``Label: value`` lines, as in the runbook's expected output."""
    typer.echo(f"{title}:")
    for label, value in fields:
        typer.echo(f"  {label}: {value}")


def emit_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "(none)") -> None:
    text_rows = [["" if v is None else str(v) for v in row] for row in rows]
    if not text_rows:
        typer.echo(empty)
        return
    widths = [max(len(col), *(len(r[i]) for r in text_rows)) for i, col in enumerate(columns)]
    typer.echo("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in text_rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def timestamp(value: datetime | None) -> str:
    """UTC, second precision, ``Z`` suffix: ``2024-01-15T10:30:00Z``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
