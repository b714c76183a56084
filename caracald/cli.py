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
    """Set up the store (the embedded PostgreSQL unless a database URL is configured) and run the gateway,
    with the ledger writer and the audit logger (and the metrics aggregator when Redis is configured) in
    the same process."""
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
    from caracald.consumers.daemons import InProcessConsumers

    # The consumers run in this process, over the bus the gateway writes to (the event log by default): the
    # events take the same path as in the distributed deployment.
    try:
        consumers = InProcessConsumers(settings, db.url).start()
    except CaracalError as exc:
        db.close()
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(3) from None
    try:
        # Events left on the log by the last run reach the ledger before the budget counters are seeded.
        if not consumers.wait_caught_up(timeout=30):
            typer.echo("Warning: the ledger writer has not caught up with the event log yet.", err=True)
        typer.echo(
            f"Gateway listening on http://{settings.gateway.host}:{settings.gateway.port} (Ctrl-C stops it)."
        )
        from caracald.gateway.server import run as run_gateway

        run_gateway(settings, db=db)
    finally:
        consumers.stop()
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


HEALTH_PORT_OPTION = typer.Option(
    8080,
    "--health-port",
    envvar="CARACAL_HEALTH_PORT",
    help="Port of /healthz and /readyz (0: any free one).",
)
METRICS_PORT_OPTION = typer.Option(
    9090, "--metrics-port", envvar="CARACAL_METRICS_PORT", help="Port of /metrics (0: any free one)."
)
LISTEN_HOST_OPTION = typer.Option(
    "0.0.0.0",  # noqa: S104 - probes and Prometheus reach the daemon from outside its pod or host
    "--listen-host",
    envvar="CARACAL_LISTEN_HOST",
    help="Address the health and metrics endpoints listen on.",
)
BATCH_SIZE_OPTION = typer.Option(
    None, "--batch-size", min=1, help="Records per batch (default: the consumer's)."
)
LOG_LEVEL_OPTION = typer.Option("INFO", "--log-level", envvar="CARACAL_LOG_LEVEL", help="Logging level.")
GROUP_OPTION = typer.Option(None, "--group", help="Consumer group (default: the consumer's own).")
TOPIC_OPTION = typer.Option(None, "--topic", help="Topic to read (default: the consumer's own).")
DLQ_TOPIC_OPTION = typer.Option("caracal.dlq", "--dlq-topic", help="Topic of the dead letters.")


def _run_consumer(
    kind: str,
    config: Path | None,
    *,
    health_port: int,
    metrics_port: int,
    listen_host: str,
    batch_size: int | None,
    log_level: str,
    group: str | None,
    topic: str | None,
    dlq_topic: str,
) -> None:
    from caracald.consumers import daemons
    from caracald.runtime.daemon import configure_logging, run_consumer
    from caracald.store.connect import resolve_url
    from caracald.store.migrate import migrate

    configure_logging(log_level)
    try:
        settings = load_config(config)
        url = resolve_url(settings)
        if settings.embedded_mode:
            migrate(url)
        built = daemons.build(
            kind,  # type: ignore[arg-type]
            settings,
            url,
            group=group,
            topic=topic,
            dlq_topic=dlq_topic,
            batch_size=batch_size,
        )
    except CaracalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(3) from None
    built.start_extras()
    code = run_consumer(
        kind,
        built.loop,
        close=built.close,
        host=listen_host,
        health_port=health_port,
        metrics_port=metrics_port,
        status=f"{kind}: consuming {built.topic} as {built.group} over {built.bus}",
    )
    raise typer.Exit(code)


def _consumer_command(name: str, summary: str) -> None:
    """Register ``caracald <name>``: the three consumer daemons take the same options."""

    def command(
        config: Path | None = CONFIG_OPTION,
        health_port: int = HEALTH_PORT_OPTION,
        metrics_port: int = METRICS_PORT_OPTION,
        listen_host: str = LISTEN_HOST_OPTION,
        batch_size: int | None = BATCH_SIZE_OPTION,
        log_level: str = LOG_LEVEL_OPTION,
        group: str | None = GROUP_OPTION,
        topic: str | None = TOPIC_OPTION,
        dlq_topic: str = DLQ_TOPIC_OPTION,
    ) -> None:
        _run_consumer(
            name,
            config,
            health_port=health_port,
            metrics_port=metrics_port,
            listen_host=listen_host,
            batch_size=batch_size,
            log_level=log_level,
            group=group,
            topic=topic,
            dlq_topic=dlq_topic,
        )

    command.__doc__ = summary
    app.command(name)(command)


_consumer_command(
    "ledger-writer",
    "Metering events from the bus into the ledger, each exactly once (group ledger-writer-group).",
)
_consumer_command(
    "metrics-aggregator", "Spend aggregates per agent, model and hour/day in Redis, and Prometheus counters."
)
_consumer_command(
    "audit-logger",
    "Audit events from the bus into the hash-chained audit log, each once (group audit-logger-group).",
)


@app.command("version")
def version() -> None:
    """Print the version."""
    from caracald import __version__

    typer.echo(__version__)


def run() -> None:
    app()
