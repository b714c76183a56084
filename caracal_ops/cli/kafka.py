"""``caracal kafka``: topics, brokers and consumer lag."""

from __future__ import annotations

import typer

from caracal_ops import kafka_admin
from caracal_ops.cli.context import state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION

app = typer.Typer(
    help="Kafka: topics, brokers and consumer lag (distributed deployment).", no_args_is_help=True
)


@app.command("list-topics")
def list_topics(
    ctx: typer.Context,
    internal: bool = typer.Option(False, "--internal", help="Include Kafka's internal topics."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List topics."""
    topics = kafka_admin.list_topics(state(ctx).config.kafka, include_internal=internal)
    if fmt is OutputFormat.JSON:
        emit_json(topics)
    else:
        emit_table(["topic"], [(t,) for t in topics], empty="No topics.")


@app.command("list-brokers")
def list_brokers(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """List the brokers of the cluster."""
    brokers = kafka_admin.list_brokers(state(ctx).config.kafka)
    if fmt is OutputFormat.JSON:
        emit_json(
            [
                {"id": b.broker_id, "host": b.host, "port": b.port, "controller": b.is_controller}
                for b in brokers
            ]
        )
        return
    emit_table(
        ["id", "host", "port", "controller"],
        [(b.broker_id, b.host, b.port, "yes" if b.is_controller else "") for b in brokers],
    )


@app.command("describe-topic")
def describe_topic(
    ctx: typer.Context, topic: str = typer.Option(..., "--topic"), fmt: OutputFormat = FORMAT_OPTION
) -> None:
    """Partitions, leaders, replicas, offsets and non-default settings of a topic."""
    info = kafka_admin.describe_topic(state(ctx).config.kafka, topic)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "topic": info.name,
                "partitions": len(info.partitions),
                "replication_factor": info.replication_factor,
                "messages": info.messages,
                "config": info.config,
                "partition_details": [
                    {
                        "partition": p.partition,
                        "leader": p.leader,
                        "replicas": list(p.replicas),
                        "isr": list(p.in_sync),
                        "low_offset": p.low,
                        "high_offset": p.high,
                    }
                    for p in info.partitions
                ],
            }
        )
        return
    emit_block(
        "Topic",
        [
            ("Name", info.name),
            ("Partitions", len(info.partitions)),
            ("Replication Factor", info.replication_factor),
            ("Messages", f"{info.messages:,}"),
            *[(key, value) for key, value in sorted(info.config.items())],
        ],
    )
    typer.echo("")
    emit_table(
        ["partition", "leader", "replicas", "isr", "low offset", "high offset"],
        [
            (
                p.partition,
                p.leader,
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.in_sync)),
                p.low,
                p.high,
            )
            for p in info.partitions
        ],
    )


@app.command("consumer-lag")
def consumer_lag(
    ctx: typer.Context,
    consumer_group: str = typer.Option(..., "--consumer-group"),
    topic: list[str] = typer.Option(
        [], "--topic", help="Only these topics (default: every topic the group committed on)."
    ),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Per partition: the group's committed offset, the log end offset and the lag."""
    lags = kafka_admin.consumer_lag(state(ctx).config.kafka, consumer_group, topic or None)
    total = sum(lag.lag for lag in lags)
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "group": consumer_group,
                "total_lag": total,
                "partitions": [
                    {
                        "topic": lag.topic,
                        "partition": lag.partition,
                        "current_offset": lag.committed,
                        "log_end_offset": lag.log_end,
                        "lag": lag.lag,
                    }
                    for lag in lags
                ],
            }
        )
        return
    emit_table(
        ["group", "topic", "partition", "current-offset", "log-end-offset", "lag"],
        [
            (
                consumer_group,
                lag.topic,
                lag.partition,
                "-" if lag.committed is None else lag.committed,
                lag.log_end,
                lag.lag,
            )
            for lag in lags
        ],
    )
    typer.echo(f"\nTotal lag: {total:,}")


@app.command("create-topics")
def create_topics(
    ctx: typer.Context,
    partitions: int = typer.Option(
        12, "--partitions", min=1, help="Partitions per topic (the ledger writers' ceiling)."
    ),
    replication_factor: int = typer.Option(3, "--replication-factor", min=1),
    retention_hours: int | None = typer.Option(
        None, "--retention-hours", min=1, help="Default: the broker's."
    ),
    topic: list[str] = typer.Option([], "--topic", help="Topics to create (default: Caracal's three)."),
) -> None:
    """Create Caracal's topics (metering, audit, DLQ) where they do not exist yet."""
    results = kafka_admin.create_topics(
        state(ctx).config.kafka,
        names=tuple(topic) or kafka_admin.CARACAL_TOPICS,
        partitions=partitions,
        replication_factor=replication_factor,
        retention_ms=retention_hours * 3_600_000 if retention_hours else None,
    )
    for name, outcome in results.items():
        typer.echo(f"{name}: {outcome}")


@app.command("rotate-credentials")
def rotate_credentials(
    ctx: typer.Context,
    user: str | None = typer.Option(None, "--user", help="The SASL user (default: kafka.sasl_username)."),
    no_restart: bool = typer.Option(False, "--no-restart", help="Do not restart the running daemons."),
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Give the SASL/SCRAM user a new random password on the brokers, write it to kafka.sasl_password_file
    (atomically, mode 0600) and restart the running daemons. Prints the plan only, unless --execute or --yes.
    Exits 1 when Kafka is not configured for SCRAM."""
    from caracal_ops.cli.procedures import run_plan
    from caracal_ops.cli.services import platform
    from caracal_ops.procedures import rotation

    cli = state(ctx)
    plan = rotation.plan_kafka_rotate_credentials(
        cli.config, lambda: platform(cli), user=user, restart=not no_restart
    )
    report = run_plan(ctx, plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes)
    if report is None:
        return
    for step in report.steps:
        if step.summary:
            typer.echo(step.summary)
    typer.echo("Kafka credentials rotated. The new password is only in the secret file.")
