"""``caracal pricebook`` against a real PostgreSQL: exact, effective-dated prices; imports all or nothing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from caracald.store.database import Database
from tests.clitools import block
from tests.integration.conftest import Cli, CliResult

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SEARCH = "https://api.search.example/*"


def rows(db: Database, query: str, *params: object) -> list[dict[str, Any]]:
    with db.read() as conn:
        return conn.execute(query, params).fetchall()


def written(db: Database) -> dict[str, int]:
    counts = {}
    with db.read() as conn:
        for table in ("price_entries", "audit_log"):
            row = conn.execute(
                sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))
            ).fetchone()
            assert row is not None
            counts[table] = int(row["n"])
    return counts


def assert_error(result: CliResult, code: int, *fragments: str) -> None:
    """One line on stderr starting with ``Error:``, nothing on stdout, the given exit code."""
    assert result.exit_code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result
    assert result.stdout == "", result


def models(cli: Cli, *extra: str) -> list[dict[str, Any]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(
        cli.ok("pricebook", "list", "--format", "json", *extra).stdout
    )
    return data["models"]


def resources(cli: Cli, *extra: str) -> list[dict[str, Any]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(
        cli.ok("pricebook", "list", "--format", "json", *extra).stdout
    )
    return data["resources"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- set


def test_set_a_model_price(cli: Cli, db: Database) -> None:
    result = cli.ok(
        "pricebook", "set", "--model", "gpt-4o", "--input", "2.50", "--output", "10.00", "--cached-input", "1.25",
        "--effective-from", "2024-05-13T00:00:00Z", actor="pricing@example.com",
    )  # fmt: skip
    assert result.stdout.splitlines()[0] == "Price set successfully:"
    fields = block(result.stdout)
    assert re.fullmatch(UUID, fields["Price ID"])
    assert fields["Model"] == "gpt-4o"
    assert fields["Effective From"] == "2024-05-13T00:00:00Z"

    (row,) = rows(db, "SELECT * FROM price_entries")
    assert str(row["price_id"]) == fields["Price ID"]
    assert (row["kind"], row["model"], row["currency"]) == ("tokens", "gpt-4o", "USD")
    assert (row["input_per_mtok"], row["output_per_mtok"], row["cached_input_per_mtok"]) == (
        Decimal("2.5"),
        Decimal("10"),
        Decimal("1.25"),
    )
    assert row["effective_from"] == datetime(2024, 5, 13, tzinfo=UTC)
    assert row["created_by"] == "pricing@example.com"


def test_set_a_pattern_price(cli: Cli, db: Database) -> None:
    result = cli.ok("pricebook", "set", "--pattern", SEARCH, "--per-request", "0.005")
    fields = block(result.stdout)
    assert fields["Pattern"] == SEARCH
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["Effective From"])  # now
    cli.ok(
        "pricebook", "set", "--pattern", r"^https://img\.example/v1/.*$", "--pattern-type", "regex",
        "--per-unit", "0.04", "--unit", "image", "--currency", "EUR",
    )  # fmt: skip

    stored = rows(db, "SELECT * FROM price_entries ORDER BY created_at")
    assert [
        (
            r["kind"],
            r["pattern"],
            r["pattern_type"],
            r["per_request"],
            r["per_unit"],
            r["unit"],
            r["currency"],
        )
        for r in stored
    ] == [
        ("request", SEARCH, "glob", Decimal("0.005"), Decimal(0), None, "USD"),
        ("request", r"^https://img\.example/v1/.*$", "regex", Decimal(0), Decimal("0.04"), "image", "EUR"),
    ]
    assert all(r["model"] is None for r in stored)


def test_list_keeps_prices_exact(cli: Cli) -> None:
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10", "--cached-input", "1.25",
           "--effective-from", "2024-01-01T00:00:00Z")  # fmt: skip
    cli.ok("pricebook", "set", "--model", "tiny", "--input", "0.000001", "--output", "0.000000000003",
           "--effective-from", "2024-01-02T00:00:00Z")  # fmt: skip
    cli.ok(
        "pricebook", "set", "--pattern", SEARCH, "--per-request", "0.005", "--effective-from", "2024-01-03"
    )

    table = cli.ok("pricebook", "list").stdout
    sections = table.split("\n\n")
    model_lines = sections[0].splitlines()
    assert model_lines[0] == "Model prices (per million tokens):"
    assert model_lines[1].split() == [
        "MODEL",
        "INPUT",
        "OUTPUT",
        "CACHED",
        "INPUT",
        "CURRENCY",
        "EFFECTIVE",
        "FROM",
    ]
    assert model_lines[2].split() == ["gpt-4o", "2.5", "10", "1.25", "USD", "2024-01-01T00:00:00Z"]
    assert model_lines[3].split() == [
        "tiny",
        "0.000001",
        "0.000000000003",
        "=input",
        "USD",
        "2024-01-02T00:00:00Z",
    ]
    resource_lines = sections[1].splitlines()
    assert resource_lines[0] == "Resource prices:"
    assert resource_lines[2].split() == [SEARCH, "glob", "0.005", "0", "-", "USD", "2024-01-03T00:00:00Z"]

    assert models(cli) == [
        {
            "model": "gpt-4o",
            "currency": "USD",
            "input_per_mtok": "2.5",
            "output_per_mtok": "10",
            "cached_input_per_mtok": "1.25",
            "effective_from": "2024-01-01T00:00:00Z",
        },
        {
            "model": "tiny",
            "currency": "USD",
            "input_per_mtok": "0.000001",
            "output_per_mtok": "0.000000000003",
            "cached_input_per_mtok": None,
            "effective_from": "2024-01-02T00:00:00Z",
        },
    ]
    assert resources(cli) == [
        {
            "pattern": SEARCH,
            "pattern_type": "glob",
            "currency": "USD",
            "per_request": "0.005",
            "per_unit": "0",
            "unit": None,
            "effective_from": "2024-01-03T00:00:00Z",
        }
    ]


def test_list_at_shows_the_version_in_force(cli: Cli) -> None:
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "5", "--output", "15",
           "--effective-from", "2024-01-01T00:00:00Z")  # fmt: skip
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10",
           "--effective-from", "2024-08-06T00:00:00Z")  # fmt: skip
    cli.ok("pricebook", "set", "--pattern", SEARCH, "--per-request", "0.01", "--effective-from", "2024-06-01")

    assert [(m["input_per_mtok"], m["output_per_mtok"]) for m in models(cli)] == [("5", "15"), ("2.5", "10")]
    assert models(cli, "--at", "2023-12-31T23:59:59Z") == []
    assert [m["input_per_mtok"] for m in models(cli, "--at", "2024-01-01T00:00:00Z")] == ["5"]
    assert [m["input_per_mtok"] for m in models(cli, "--at", "2024-08-05T23:59:59Z")] == ["5"]
    assert [m["input_per_mtok"] for m in models(cli, "--at", "2024-08-06T00:00:00Z")] == ["2.5"]
    assert [m["input_per_mtok"] for m in models(cli, "--at", "now")] == ["2.5"]
    assert resources(cli, "--at", "2024-05-31T00:00:00Z") == []
    assert [r["per_request"] for r in resources(cli, "--at", "2024-07-01")] == ["0.01"]

    table = cli.ok("pricebook", "list", "--at", "2024-03-01T00:00:00Z").stdout.splitlines()
    assert table[2].split()[:3] == ["gpt-4o", "5", "15"]
    assert len([line for line in table if line.startswith("gpt-4o")]) == 1

    assert_error(cli("pricebook", "list", "--at", "last tuesday"), 2, "invalid --at")


def test_duplicate_version_is_refused(cli: Cli, db: Database) -> None:
    args = ("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10",
            "--effective-from", "2024-05-13T00:00:00Z")  # fmt: skip
    cli.ok(*args)
    before = written(db)
    assert_error(cli(*args), 1, "already takes effect at that exact time")
    # the same instant written with another offset is the same version
    same = cli("pricebook", "set", "--model", "gpt-4o", "--input", "3", "--output", "12",
               "--effective-from", "2024-05-13T02:00:00+02:00")  # fmt: skip
    assert_error(same, 1, "already takes effect")
    pattern = (
        "pricebook",
        "set",
        "--pattern",
        SEARCH,
        "--per-request",
        "0.01",
        "--effective-from",
        "2024-01-01",
    )
    cli.ok(*pattern)
    assert_error(cli(*pattern), 1, "already takes effect")
    assert written(db)["price_entries"] == before["price_entries"] + 1


def test_bad_set_options_are_bad_input_and_write_nothing(cli: Cli, db: Database) -> None:
    for args, message in [
        (["--model", "m", "--pattern", SEARCH, "--input", "1", "--output", "1"], "give either --model"),
        (["--input", "1", "--output", "1"], "give either --model"),
        (["--model", "m", "--input", "1"], "needs --input and --output"),
        (["--model", "m", "--output", "1"], "needs --input and --output"),
        (["--model", "m", "--input", "-1", "--output", "1"], "must not be negative"),
        (["--model", "m", "--input", "cheap", "--output", "1"], "is not a number"),
        (["--model", "m", "--input", "NaN", "--output", "1"], "not a finite number"),
        (["--model", "m", "--input", "1", "--output", "1e999"], "too large"),
        (["--model", "m", "--input", "0.0000000000001", "--output", "1"], "more than 12 decimal places"),
        (["--model", "m", "--input", "1", "--output", "1", "--currency", "USX"], "unknown currency"),
        (
            ["--model", "m", "--input", "1", "--output", "1", "--effective-from", "soon"],
            "invalid effective-from",
        ),
        (["--pattern", SEARCH], "needs --per-request and/or --per-unit"),
        (["--pattern", "https://x/[a", "--per-request", "1"], "unterminated"),
        (["--pattern", SEARCH, "--per-request", "1", "--pattern-type", "wild"], "unknown pattern type"),
        (["--pattern", SEARCH, "--per-unit", "1"], "no unit name"),
    ]:
        assert_error(cli("pricebook", "set", *args), 2, message)
    assert written(db) == {"price_entries": 0, "audit_log": 0}


# --------------------------------------------------------------------------- import


YAML_PRICES = """\
# unquoted decimals must stay exact
prices:
  - model: gpt-4o-mini
    input: 0.15
    output: 0.6
    cached_input: 0.075
    effective_from: 2024-07-18
  - model: claude-3-5-haiku
    input: 0.8
    output: 4
    currency: usd
    effective_from: "2024-11-04T00:00:00Z"
  - pattern: "https://api.search.example/*"
    per_request: 0.005
  - pattern: '^https://img\\.example/.*$'
    pattern_type: regex
    per_unit: 0.04
    unit: image
    currency: EUR
"""


def test_import_yaml_keeps_unquoted_decimals_exact(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path / "prices.yaml", YAML_PRICES)
    result = cli.ok("pricebook", "import", path, actor="pricing@example.com")
    assert result.stdout.strip() == f"Imported 4 prices from {path}."

    stored = {r["model"] or r["pattern"]: r for r in rows(db, "SELECT * FROM price_entries")}
    mini = stored["gpt-4o-mini"]
    assert (mini["input_per_mtok"], mini["output_per_mtok"], mini["cached_input_per_mtok"]) == (
        Decimal("0.15"),
        Decimal("0.6"),
        Decimal("0.075"),
    )
    assert mini["effective_from"] == datetime(2024, 7, 18, tzinfo=UTC)
    haiku = stored["claude-3-5-haiku"]
    assert (haiku["input_per_mtok"], haiku["output_per_mtok"], haiku["currency"]) == (
        Decimal("0.8"),
        Decimal("4"),
        "USD",
    )
    assert stored[SEARCH]["per_request"] == Decimal("0.005")
    image = stored[r"^https://img\.example/.*$"]
    assert (image["pattern_type"], image["per_unit"], image["unit"], image["currency"]) == (
        "regex",
        Decimal("0.04"),
        "image",
        "EUR",
    )
    assert {r["created_by"] for r in stored.values()} == {"pricing@example.com"}

    listed = {m["model"]: m for m in models(cli)}
    assert (listed["gpt-4o-mini"]["input_per_mtok"], listed["gpt-4o-mini"]["cached_input_per_mtok"]) == (
        "0.15",
        "0.075",
    )
    assert listed["claude-3-5-haiku"]["output_per_mtok"] == "4"

    actions = rows(db, "SELECT action, actor FROM audit_log ORDER BY audit_id")
    assert [(a["action"], a["actor"]) for a in actions] == [
        ("pricebook.set_model", "pricing@example.com"),
        ("pricebook.set_model", "pricing@example.com"),
        ("pricebook.set_resource", "pricing@example.com"),
        ("pricebook.set_resource", "pricing@example.com"),
    ]


def test_import_json_and_csv(cli: Cli, db: Database, tmp_path: Path) -> None:
    json_path = write(
        tmp_path / "prices.json",
        '{"prices": [{"model": "claude-3-5-sonnet", "input": 3.0, "output": 15.1,'
        ' "effective_from": "2024-10-22T00:00:00Z"},'
        ' {"pattern": "https://api.search.example/*", "per_request": 0.0001}]}',
    )
    assert cli.ok("pricebook", "import", json_path).stdout.strip() == f"Imported 2 prices from {json_path}."
    csv_path = write(
        tmp_path / "prices.csv",
        "model,input,output,cached_input,currency,effective_from\n"
        "mistral-large,1.8,5.4,,EUR,2024-11-01T00:00:00Z\n"
        "mistral-small,0.1,0.3,0.05,EUR,2024-11-01\n",
    )
    assert cli.ok("pricebook", "import", csv_path).stdout.strip() == f"Imported 2 prices from {csv_path}."

    stored = {r["model"] or r["pattern"]: r for r in rows(db, "SELECT * FROM price_entries")}
    assert (
        stored["claude-3-5-sonnet"]["input_per_mtok"],
        stored["claude-3-5-sonnet"]["output_per_mtok"],
    ) == (
        Decimal("3"),
        Decimal("15.1"),
    )
    assert stored[SEARCH]["per_request"] == Decimal("0.0001")
    large, small = stored["mistral-large"], stored["mistral-small"]
    assert (large["input_per_mtok"], large["output_per_mtok"], large["cached_input_per_mtok"]) == (
        Decimal("1.8"),
        Decimal("5.4"),
        None,
    )
    assert (small["cached_input_per_mtok"], small["currency"]) == (Decimal("0.05"), "EUR")
    assert small["effective_from"] == datetime(2024, 11, 1, tzinfo=UTC)
    listed = {m["model"]: m for m in models(cli)}
    assert listed["claude-3-5-sonnet"]["output_per_mtok"] == "15.1"
    assert listed["mistral-small"]["cached_input_per_mtok"] == "0.05"


GOOD = "  - model: good-model\n    input: 1\n    output: 2\n"
BAD_RECORDS = [
    ("  - model: bad-model\n    input: 1\n    output: 2\n    currency: USX\n", "unknown currency 'USX'"),
    ("  - model: bad-model\n    input: .nan\n    output: 2\n", "is not a number"),
    ("  - model: bad-model\n    input: .inf\n    output: 2\n", "is not a number"),
    ("  - model: bad-model\n    input: 0.0000000000001\n    output: 2\n", "more than 12 decimal places"),
    ("  - model: bad-model\n    input: -0.5\n    output: 2\n", "must not be negative"),
    ("  - model: bad-model\n    input: true\n    output: 2\n", "must be a number"),
    ("  - model: bad-model\n    input: 1\n", "missing 'output'"),
    ("  - model: bad-model\n    input: 1\n    output: 2\n    price: 3\n", "unknown field 'price'"),
    ("  - model: bad-model\n    input: 1\n    output: 2\n    effective_from: soon\n", "not an ISO 8601 time"),
    ("  - pattern: 'https://x/[a'\n    per_request: 1\n", "unterminated"),
    ("  - model: bad-model\n    pattern: 'https://x/*'\n", "has both 'model' and 'pattern'"),
]


def test_import_with_one_bad_record_writes_nothing(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    for bad, message in BAD_RECORDS:
        write(path, "prices:\n" + GOOD + bad + GOOD.replace("good-model", "other-model"))
        assert_error(cli("pricebook", "import", str(path)), 2, "record 2:", message)
    json_path = write(
        tmp_path / "prices.json", '[{"model": "a", "input": "1", "output": "2"}, {"model": "b"}]'
    )
    assert_error(cli("pricebook", "import", json_path), 2, "record 2:", "missing 'input'")
    csv_path = write(tmp_path / "prices.csv", "model,input,output\na,1,2\nb,1,x\n")
    assert_error(cli("pricebook", "import", csv_path), 2, "record 2:", "is not a number")
    assert written(db) == {"price_entries": 0, "audit_log": 0}


def test_import_is_all_or_nothing_in_the_database(cli: Cli, db: Database, tmp_path: Path) -> None:
    cli.ok("pricebook", "set", "--model", "gpt-4o", "--input", "2.5", "--output", "10",
           "--effective-from", "2024-05-13T00:00:00Z")  # fmt: skip
    before = written(db)
    # record 1 is new, record 2 collides with the price already stored: neither is written
    path = write(
        tmp_path / "prices.yaml",
        "- model: new-model\n  input: 1\n  output: 2\n  effective_from: 2024-05-13\n"
        "- model: gpt-4o\n  input: 3\n  output: 12\n  effective_from: 2024-05-13T00:00:00Z\n",
    )
    assert_error(cli("pricebook", "import", path), 1, "already takes effect")
    assert written(db) == before
    assert [r["model"] for r in rows(db, "SELECT model FROM price_entries")] == ["gpt-4o"]


def test_unreadable_import_files_are_bad_input(cli: Cli, db: Database, tmp_path: Path) -> None:
    not_yaml = write(tmp_path / "broken.yaml", "prices: [unclosed\n")
    assert_error(cli("pricebook", "import", not_yaml), 2, "is not valid yaml", "at line 2, column 1")
    control = write(tmp_path / "control.yaml", "- model: a\x07\n")
    assert_error(cli("pricebook", "import", control), 2, "is not valid yaml", "unacceptable character")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("- model: caf\u00e9\n".encode("latin-1"))
    assert_error(cli("pricebook", "import", str(latin)), 2, "is not UTF-8 text")
    not_json = write(tmp_path / "broken.json", "{")
    assert_error(cli("pricebook", "import", not_json), 2, "is not valid json")
    not_a_list = write(tmp_path / "scalar.yaml", "just text\n")
    assert_error(cli("pricebook", "import", not_a_list), 2, "must hold a list of price records")
    assert cli("pricebook", "import", str(tmp_path / "missing.yaml")).exit_code == 2
    assert written(db) == {"price_entries": 0, "audit_log": 0}
