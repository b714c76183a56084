"""``caracald``: Caracal's daemons. On the embedded default, one process runs everything."""

from __future__ import annotations

from pathlib import Path

import typer

from caracald.core.errors import CaracalError
from caracald.runtime.config import load_config
from caracald.store.connect import open_database
from caracald.store.migrate import latest_version

app = typer.Typer(
    name="caracald",
    help="Caracal's daemons.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("up")
def up(
    config: Path | None = typer.Option(None, "--config", envvar="CARACAL_CONFIG", dir_okay=False),
) -> None:
    """Set up and open the store (the embedded PostgreSQL unless a database URL is configured)."""
    try:
        settings = load_config(config)
        with open_database(settings, auto_migrate=True) as db:
            db.ping()
    except CaracalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(3) from None
    where = (
        f"embedded PostgreSQL in {settings.embedded.data_dir}"
        if settings.embedded_mode
        else "external PostgreSQL"
    )
    typer.echo(f"Caracal store ready: {where}, schema version {latest_version()}.")
    typer.echo("Create your first agent and give it a budget:")
    typer.echo('  caracal agent create --name my-agent --owner you@example.com --description "My AI agent"')
    typer.echo(
        "  caracal policy create --agent-id <AGENT_ID> --limit 100.00 --currency USD "
        '--time-window daily --window-type calendar --change-reason "Initial budget allocation"'
    )


@app.command("version")
def version() -> None:
    """Print the version."""
    from caracald import __version__

    typer.echo(__version__)


def run() -> None:
    app()
