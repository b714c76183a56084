"""``caracal db``: health, migrations, read-only queries, reset, and the embedded server."""

from __future__ import annotations

import typer

from caracal_ops.cli.context import EXIT_FAILED, fail, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_block, emit_json, emit_table
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION
from caracald.admin import database as db_admin
from caracald.store import embedded
from caracald.store.connect import resolve_url
from caracald.store.database import Database
from caracald.store.migrate import migrate as apply_migrations

app = typer.Typer(help="The PostgreSQL store.", no_args_is_help=True)


@app.command("health-check")
def health_check(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Check connectivity, latency, schema version and the read replica. Exits 1 when unhealthy."""
    report = db_admin.health_check(state(ctx).db)
    mode = "embedded" if state(ctx).config.embedded_mode else "external"
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "status": "healthy" if report.healthy else "unhealthy",
                "mode": mode,
                "server_version": report.server_version,
                "latency_ms": round(report.latency_ms, 2),
                "schema_version": report.schema_version,
                "expected_schema_version": report.expected_schema_version,
                "read_replica": report.replica,
                "pool": report.pool,
                "problems": list(report.problems),
            }
        )
    else:
        fields: list[tuple[str, object]] = [
            ("Status", "healthy" if report.healthy else "UNHEALTHY"),
            ("Mode", mode),
            ("Server Version", f"PostgreSQL {report.server_version}"),
            ("Latency", f"{report.latency_ms:.1f} ms"),
            ("Schema Version", f"{report.schema_version} (latest {report.expected_schema_version})"),
            ("Read Replica", report.replica),
            ("Pool", f"{report.pool.get('pool_size', 0)} open, {report.pool.get('pool_available', 0)} idle"),
        ]
        fields += [("Problem", p) for p in report.problems]
        emit_block("Database Health", fields)
    if not report.healthy:
        raise typer.Exit(EXIT_FAILED)


@app.command("migrate")
def migrate(ctx: typer.Context) -> None:
    """Apply pending schema migrations (safe to run again, and from several machines at once)."""
    cli = state(ctx)
    url = resolve_url(cli.config)
    report = apply_migrations(url)
    if report.applied:
        with Database(url) as db:
            db_admin.record_migrations(
                db,
                [f"{m.version:04d}_{m.name}" for m in report.applied],
                report.current_version,
                actor=cli.who,
            )
        for m in report.applied:
            typer.echo(f"Applied {m.version:04d}_{m.name}")
    typer.echo(f"Schema is at version {report.current_version} (up to date).")


@app.command("query")
def query(
    ctx: typer.Context,
    sql: str = typer.Argument(..., help="One SQL statement, run read-only."),
    limit: int = typer.Option(1000, "--limit", min=1, max=100_000, help="Return at most this many rows."),
    timeout_ms: int = typer.Option(10_000, "--timeout-ms", min=100, help="Statement timeout."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Run an ad hoc query in a READ ONLY transaction with a timeout and a row limit."""
    result = db_admin.read_only_query(state(ctx).db, sql, row_limit=limit, timeout_ms=timeout_ms)
    if fmt is OutputFormat.JSON:
        emit_json(
            {"columns": result.columns, "rows": [list(r) for r in result.rows], "truncated": result.truncated}
        )
    else:
        emit_table(result.columns, result.rows, empty="(0 rows)")
    if result.truncated:
        typer.echo(f"Output truncated to {limit} rows (raise --limit to see more).", err=True)


@app.command("reset")
def reset(
    ctx: typer.Context,
    confirm: bool = typer.Option(False, "--confirm", help="Really delete every Caracal table and its data."),
) -> None:
    """Delete ALL Caracal data and recreate an empty schema (recovery procedures start here)."""
    cli = state(ctx)
    if not confirm:
        target = "the embedded database" if cli.config.embedded_mode else "the configured database"
        raise fail(
            f"db reset deletes every agent, policy, price, ledger event and audit record in {target}; "
            "run it again with --confirm to proceed"
        )
    version = db_admin.reset(cli.db, actor=cli.who)
    typer.echo(f"Database reset: empty schema at version {version}.")


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the embedded PostgreSQL server (it starts again on the next command)."""
    cli = state(ctx)
    if not cli.config.embedded_mode:
        raise fail("db stop only stops the embedded server; this configuration uses an external PostgreSQL")
    if embedded.stop(cli.config.embedded.data_dir):
        typer.echo(f"Embedded PostgreSQL in {cli.config.embedded.data_dir} stopped.")
    else:
        typer.echo("Embedded PostgreSQL is not running.")


@app.command("rotate-password")
def rotate_password(
    ctx: typer.Context,
    role: str | None = typer.Option(None, "--role", help="The role (default: the database URL's user)."),
    no_restart: bool = typer.Option(False, "--no-restart", help="Do not restart the running daemons."),
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Give the PostgreSQL role a new random password, write it to database.password_file (atomically,
    mode 0600) and restart the running daemons. Prints the plan only, unless --execute or --yes."""
    from caracal_ops.cli.procedures import run_plan
    from caracal_ops.cli.services import platform
    from caracal_ops.procedures import rotation

    cli = state(ctx)
    url = resolve_url(cli.config)
    rotation_plan = rotation.plan_db_rotate_password(
        cli.config, url, lambda: platform(cli), role=role, restart=not no_restart
    )
    report = run_plan(
        ctx,
        rotation_plan.plan,
        execute_it=execute_it or yes,
        dry_run=dry_run,
        yes=yes,
        audit=rotation.FollowingAuditSink(rotation_plan.current_url, cli.who),
    )
    if report is None:
        return
    for step in report.steps:
        if step.summary:
            typer.echo(step.summary)
    typer.echo("Password rotated. The new password is only in the secret file.")
