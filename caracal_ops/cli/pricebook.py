"""``caracal pricebook``: what each model's tokens and each priced URL cost."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
import yaml

from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json, emit_table, timestamp
from caracald.admin import pricebook as price_admin
from caracald.admin.common import now
from caracald.core.allowlist import PatternType
from caracald.core.errors import ValidationError
from caracald.core.money import check_currency, parse_decimal
from caracald.core.pricebook import ResourcePrice, TokenPrice
from caracald.core.timeparse import parse_timestamp

app = typer.Typer(help="Prices of models and resources, effective-dated.", no_args_is_help=True)


def _price(text: str | None, what: str) -> Any:
    return None if text is None else parse_decimal(text, what=what)


@app.command("set")
def set_price(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="Model name, e.g. gpt-4o (token pricing)."),
    input_price: str | None = typer.Option(None, "--input", help="Price per million input tokens."),
    output_price: str | None = typer.Option(None, "--output", help="Price per million output tokens."),
    cached_input_price: str | None = typer.Option(
        None, "--cached-input", help="Price per million cached input tokens (default: the input price)."
    ),
    pattern: str | None = typer.Option(None, "--pattern", help="URL pattern (request pricing)."),
    pattern_type: str = typer.Option("glob", "--pattern-type", help="regex or glob."),
    per_request: str | None = typer.Option(None, "--per-request", help="Price per request."),
    per_unit: str | None = typer.Option(None, "--per-unit", help="Price per unit (see --unit)."),
    unit: str | None = typer.Option(None, "--unit", help="What a unit is, e.g. 'search' or 'page'."),
    currency: str = typer.Option("USD", "--currency"),
    effective_from: str | None = typer.Option(
        None, "--effective-from", help="When the price takes effect (ISO 8601; default now)."
    ),
) -> None:
    """Add a price version for a model (--model) or for a URL pattern (--pattern)."""
    if (model is None) == (pattern is None):
        raise ValidationError("give either --model (token prices) or --pattern (request prices)")
    when = parse_timestamp(effective_from, what="effective-from") if effective_from else now()
    code = check_currency(currency)
    price: TokenPrice | ResourcePrice
    if model is not None:
        if input_price is None or output_price is None:
            raise ValidationError("a model price needs --input and --output (per million tokens)")
        price = TokenPrice(
            model=model,
            currency=code,
            input_per_mtok=_price(input_price, "input price"),
            output_per_mtok=_price(output_price, "output price"),
            cached_input_per_mtok=_price(cached_input_price, "cached input price"),
            effective_from=when,
        )
    else:
        assert pattern is not None
        if per_request is None and per_unit is None:
            raise ValidationError("a resource price needs --per-request and/or --per-unit")
        try:
            kind = PatternType(pattern_type.lower())
        except ValueError:
            raise ValidationError(f"unknown pattern type {pattern_type!r}: use regex or glob") from None
        price = ResourcePrice(
            pattern=pattern,
            pattern_type=kind,
            currency=code,
            per_request=_price(per_request or "0", "per-request price"),
            per_unit=_price(per_unit or "0", "per-unit price"),
            unit=unit,
            effective_from=when,
        )
    (price_id,) = price_admin.set_prices(state(ctx).db, [price], actor=state(ctx).who)
    typer.echo("Price set successfully:")
    typer.echo(f"  Price ID: {price_id}")
    typer.echo(f"  {'Model' if model else 'Pattern'}: {model or pattern}")
    typer.echo(f"  Effective From: {timestamp(when)}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return [
                {k: v for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(io.StringIO(text))
            ]
        # YAML's float parsing would make prices inexact: parse numbers as strings
        if suffix == ".json":
            data = json.loads(text, parse_float=str)
        else:
            data = yaml.load(text, Loader=_ExactLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValidationError(
            f"{path} is not valid {suffix.lstrip('.') or 'YAML'}: {_parse_problem(exc)}"
        ) from None
    if isinstance(data, dict) and "prices" in data:
        data = data["prices"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValidationError(f"{path} must hold a list of price records (or a mapping with a 'prices' list)")
    return data


def _parse_problem(exc: Exception) -> str:
    """The parser's complaint on one line (YAML's spans several, with a quote of the text)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem}{where}"
    return " ".join(str(exc).split())


class _ExactLoader(yaml.SafeLoader):
    """A safe YAML loader that keeps numbers with a fraction as text, so they parse exactly as Decimal."""


def _as_text(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _as_text)
_ExactLoader.add_constructor("tag:yaml.org,2002:timestamp", _as_text)


@app.command("import")
def import_prices(
    ctx: typer.Context,
    path: Path = typer.Argument(
        ..., help="YAML, JSON or CSV file of price records.", exists=True, dir_okay=False
    ),
) -> None:
    """Import many prices at once, all or nothing."""
    records = _read_records(path)
    ids = price_admin.import_records(state(ctx).db, records, actor=state(ctx).who)
    typer.echo(f"Imported {len(ids)} price{'s' if len(ids) != 1 else ''} from {path}.")


@app.command("list")
def list_prices(
    ctx: typer.Context,
    at: str | None = typer.Option(None, "--at", help="Only the prices in force at this time."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List token and request prices, every version unless --at is given."""
    tokens, resources = price_admin.list_prices(state(ctx).db)
    if at is not None:
        when = parse_timestamp(at, what="--at")
        tokens = _in_force(tokens, when, lambda p: p.model)
        resources = _in_force(resources, when, lambda p: (p.pattern, str(p.pattern_type)))
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "models": [
                    {
                        "model": p.model,
                        "currency": p.currency,
                        "input_per_mtok": _num(p.input_per_mtok),
                        "output_per_mtok": _num(p.output_per_mtok),
                        "cached_input_per_mtok": _num_or_none(p.cached_input_per_mtok),
                        "effective_from": p.effective_from,
                    }
                    for p in tokens
                ],
                "resources": [
                    {
                        "pattern": p.pattern,
                        "pattern_type": p.pattern_type,
                        "currency": p.currency,
                        "per_request": _num(p.per_request),
                        "per_unit": _num(p.per_unit),
                        "unit": p.unit,
                        "effective_from": p.effective_from,
                    }
                    for p in resources
                ],
            }
        )
        return
    typer.echo("Model prices (per million tokens):")
    emit_table(
        ["model", "input", "output", "cached input", "currency", "effective from"],
        [
            (
                p.model,
                _num(p.input_per_mtok),
                _num(p.output_per_mtok),
                _num(p.cached_input_per_mtok) if p.cached_input_per_mtok is not None else "=input",
                p.currency,
                timestamp(p.effective_from),
            )
            for p in tokens
        ],
    )
    typer.echo("")
    typer.echo("Resource prices:")
    emit_table(
        ["pattern", "type", "per request", "per unit", "unit", "currency", "effective from"],
        [
            (
                p.pattern,
                p.pattern_type,
                _num(p.per_request),
                _num(p.per_unit),
                p.unit or "-",
                p.currency,
                timestamp(p.effective_from),
            )
            for p in resources
        ],
    )


def _num(value: Any) -> str:
    """A price as exact plain text without the store's trailing zeros: ``2.5``, not ``2.500000000000``."""
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _num_or_none(value: Any) -> str | None:
    return None if value is None else _num(value)


def _in_force(prices: list[Any], when: datetime, key: Any) -> list[Any]:
    latest: dict[Any, Any] = {}
    for p in prices:
        if p.effective_from <= when and (
            key(p) not in latest or latest[key(p)].effective_from < p.effective_from
        ):
            latest[key(p)] = p
    return list(latest.values())
