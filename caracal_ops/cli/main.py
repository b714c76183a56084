"""The ``caracal`` entry point: global options, shared state, and errors turned into one clear line.

Exit codes: 0 success, 1 the operation failed (not found, conflict), 2 bad input or usage,
3 a service (PostgreSQL) is unavailable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import psycopg
import typer
from typer._click.exceptions import UsageError  # typer bundles click; its usage error is not re-exported
from typer.core import TyperGroup

from caracal_ops.cli.context import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNAVAILABLE, CliState, fail
from caracald.core.errors import CaracalError, StoreUnavailableError, ValidationError


class CaracalGroup(TyperGroup):
    """Catches Caracal's errors anywhere below it and prints them as one line on stderr."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            raise fail(exc.message, EXIT_BAD_INPUT) from None
        except StoreUnavailableError as exc:
            raise fail(exc.message, EXIT_UNAVAILABLE) from None
        except CaracalError as exc:
            raise fail(exc.message, EXIT_FAILED) from None
        except psycopg.OperationalError as exc:
            raise fail(
                f"PostgreSQL is unavailable: {str(exc).strip().splitlines()[0]}", EXIT_UNAVAILABLE
            ) from None
        except psycopg.Error as exc:
            raise fail(
                f"database error: {(exc.diag.message_primary or str(exc)).strip()}", EXIT_FAILED
            ) from None
        except UsageError as exc:
            # one line, like every other error; the full usage is one --help away
            where = exc.ctx.command_path if exc.ctx is not None else "caracal"
            raise fail(f"{exc.format_message()} (see '{where} --help')", EXIT_BAD_INPUT) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:
            # a bug: still one line for the operator; CARACAL_DEBUG=1 shows the traceback
            if os.environ.get("CARACAL_DEBUG"):
                raise
            raise fail(
                f"internal error ({type(exc).__name__}: {exc}); rerun with CARACAL_DEBUG=1 for details"
            ) from None


app = typer.Typer(
    cls=CaracalGroup,
    name="caracal",
    help="Operate Caracal: agents, budgets, allowlists, prices, the ledger and its audit trail.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", envvar="CARACAL_CONFIG", help="YAML configuration file.", dir_okay=False
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="PostgreSQL URL (also CARACAL_DATABASE_URL). Without one, the embedded PostgreSQL is used.",
        show_default=False,
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Data folder of the embedded PostgreSQL (also CARACAL_DATA_DIR).",
        file_okay=False,
    ),
    actor: str | None = typer.Option(
        None,
        "--actor",
        envvar="CARACAL_ACTOR",
        help="Who is acting, for the audit log (default: the OS user).",
    ),
) -> None:
    # the pool's own reconnection warnings would bury the one-line error a command prints
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    cli_state = CliState(config_path=config, database_url=database_url, data_dir=data_dir, actor=actor)
    ctx.obj = cli_state
    ctx.call_on_close(cli_state.close)


def _register() -> None:
    from caracal_ops.cli import (
        agent,
        allowlist,
        audit,
        backup,
        budget,
        config_cmd,
        db,
        emergency,
        kafka,
        ledger,
        merkle,
        policy,
        pricebook,
        services,
        snapshot,
        status,
    )

    app.add_typer(agent.app, name="agent")
    app.add_typer(policy.app, name="policy")
    app.add_typer(allowlist.app, name="allowlist")
    app.add_typer(pricebook.app, name="pricebook")
    app.add_typer(ledger.app, name="ledger")
    app.add_typer(budget.app, name="budget")
    app.add_typer(audit.app, name="audit")
    app.add_typer(merkle.app, name="merkle")
    app.add_typer(db.app, name="db")
    app.add_typer(kafka.app, name="kafka")
    app.add_typer(config_cmd.app, name="config")
    app.add_typer(backup.app, name="backup")
    app.add_typer(services.app, name="services")
    app.command("logs")(services.logs)
    app.add_typer(snapshot.app, name="snapshot")
    app.command("status")(status.status)
    app.add_typer(emergency.app, name="emergency")
    from caracal_ops.cli import dlq, replay  # the event pipeline's operations

    app.add_typer(dlq.app, name="dlq")
    app.add_typer(replay.app, name="replay")


_register()


def run() -> None:
    app()
