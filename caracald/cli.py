"""``caracald``: Caracal's daemons. On the embedded default, one process runs everything."""

from __future__ import annotations

from pathlib import Path

import typer

from caracald.core.errors import CaracalError
from caracald.runtime.config import CaracalConfig, load_config
from caracald.store.connect import open_database
from caracald.store.migrate import latest_version

app = typer.Typer(
    name="caracald",
    help="Caracal's daemons.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


CONFIG_OPTION = typer.Option(None, "--config", envvar="CARACAL_CONFIG", dir_okay=False)


def _next_steps(settings: CaracalConfig) -> None:
    gateway = settings.gateway
    base = f"http://{gateway.host}:{gateway.port}"
    typer.echo("Create your first agent and give it a budget:")
    typer.echo('  caracal agent create --name my-agent --owner you@example.com --description "My AI agent"')
    typer.echo(
        "  caracal policy create --agent-id <AGENT_ID> --limit 100.00 --currency USD "
        '--time-window daily --window-type calendar --change-reason "Initial budget allocation"'
    )
    typer.echo("  caracal allowlist create --agent-id <AGENT_ID> --pattern 'https://api.openai.com/*'")
    typer.echo("  caracal pricebook set --model gpt-4o-mini --input 0.15 --output 0.60")
    typer.echo("Then call the gateway with the agent's key (the provider key stays in the gateway's config):")
    typer.echo(
        f"  curl {base}/openai/v1/chat/completions -H 'Authorization: Bearer <CARACAL_KEY>' "
        "-H 'Content-Type: application/json' "
        """-d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'"""
    )
    typer.echo(f'  OpenAI(base_url="{base}/openai/v1", api_key="<CARACAL_KEY>")')
    typer.echo(f'  Anthropic(base_url="{base}/anthropic", api_key="<CARACAL_KEY>")')


@app.command("up")
def up(
    config: Path | None = CONFIG_OPTION,
    setup_only: bool = typer.Option(
        False, "--setup-only", help="Set up the store, then exit without serving."
    ),
) -> None:
    """Set up the store (the embedded PostgreSQL unless a database URL is configured) and run the gateway."""
    try:
        settings = load_config(config)
        db = open_database(settings, auto_migrate=True)
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
    _next_steps(settings)
    if setup_only:
        db.close()
        return
    typer.echo(
        f"Gateway listening on http://{settings.gateway.host}:{settings.gateway.port} (Ctrl-C stops it)."
    )
    try:
        from caracald.gateway.server import run as run_gateway

        run_gateway(settings, db=db)
    finally:
        db.close()


@app.command("gateway")
def gateway(
    config: Path | None = CONFIG_OPTION,
    host: str | None = typer.Option(None, "--host", help="Address to listen on (gateway.host)."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (gateway.port)."),
) -> None:
    """Run the gateway (one uvicorn worker): agents call it instead of the providers' APIs."""
    try:
        settings = load_config(config, overrides={("gateway", "host"): host, ("gateway", "port"): port})
    except CaracalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(3) from None
    from caracald.gateway.server import run as run_gateway

    run_gateway(settings)


@app.command("version")
def version() -> None:
    """Print the version."""
    from caracald import __version__

    typer.echo(__version__)


def run() -> None:
    app()
