"""``caracal emergency``: stop and resume writes, preserve evidence, restart everything, rotate everything.

Every procedure prints its plan first; the destructive ones only print it unless ``--execute`` or ``--yes``
(``--dry-run`` says so explicitly), ask for a typed confirmation unless ``--yes``, and are audited as
``ops_procedure`` events.
"""

from __future__ import annotations

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.procedures import DRY_RUN_OPTION, EXECUTE_OPTION, YES_OPTION, audit_sink, run_plan
from caracal_ops.cli.services import platform
from caracal_ops.procedures import emergency
from caracal_ops.procedures.framework import Plan, RunReport
from caracal_ops.procedures.rotation import FollowingAuditSink

app = typer.Typer(
    help="Emergency procedures: stop-writes, resume-writes, preserve-evidence, restart-all, rotate-all.",
    no_args_is_help=True,
)


def env(cli: CliState) -> emergency.EmergencyEnv:
    return emergency.EmergencyEnv(
        config=cli.config,
        actor=cli.who,
        db=lambda: cli.db,
        platform=lambda: platform(cli),
        audit=lambda: audit_sink(cli),
    )


def _report(report: RunReport | None, plan: Plan) -> bool:
    if report is None:
        return False
    for step in report.steps:
        if step.summary:
            typer.echo(step.summary)
    for warning in report.warnings:
        typer.echo(f"Warning: {warning}")
    return True


@app.command("stop-writes")
def stop_writes(
    ctx: typer.Context,
    reason: str = typer.Option(
        "emergency stop-writes", "--reason", help="Why, for the switch and the audit log."
    ),
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Turn the gateway's deny-all switch on (every replica denies within a second), then stop the gateway
    and the ledger writer on the configured platform. Undo with `caracal emergency resume-writes`."""
    plan = emergency.plan_stop_writes(env(state(ctx)), reason=reason)
    if _report(run_plan(ctx, plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes), plan):
        typer.echo(f"Writes stopped. Undo with: {emergency.UNDO}")


@app.command("resume-writes")
def resume_writes(
    ctx: typer.Context,
    component: list[str] = typer.Option(
        [], "--component", "-c", help="Start these (default: what the last stop-writes stopped)."
    ),
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Undo stop-writes: start the ledger writer and the gateway again, then turn deny-all off."""
    plan = emergency.plan_resume_writes(env(state(ctx)), component)
    if _report(run_plan(ctx, plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes), plan):
        typer.echo("Writes resumed: the gateway serves again.")


@app.command("preserve-evidence")
def preserve_evidence(
    ctx: typer.Context,
    tag: str = typer.Option(..., "--tag", help="A label for the evidence, e.g. corruption-evidence."),
    log_lines: int = typer.Option(10_000, "--log-lines", min=1, help="Log lines to keep per daemon."),
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Back up PostgreSQL (and the Kafka topics), collect every daemon's logs and the status of every
    component into one folder with a SHA-256 manifest. Changes nothing."""
    plan = emergency.plan_preserve_evidence(env(state(ctx)), tag=tag, log_lines=log_lines)
    report = run_plan(ctx, plan, dry_run=dry_run, yes=yes)
    if _report(report, plan) and report is not None:
        typer.echo(f"Evidence preserved in {report.result.get('folder')}")


@app.command("restart-all")
def restart_all(
    ctx: typer.Context,
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Restart in order -- database, Kafka, Redis, gateway, consumers -- checking each one's health before
    the next. Services the platform does not manage are checked, not restarted."""
    plan = emergency.plan_restart_all(env(state(ctx)))
    if _report(run_plan(ctx, plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes), plan):
        typer.echo("Every component restarted and healthy.")


@app.command("rotate-all")
def rotate_all(
    ctx: typer.Context,
    execute_it: bool = EXECUTE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    yes: bool = YES_OPTION,
) -> None:
    """Rotate the database password, the Kafka SCRAM credentials and the Merkle signing key in sequence,
    then restart the running daemons once. Credentials that are not configured are skipped (noted)."""
    cli = state(ctx)
    config = cli.config
    url = (
        None
        if config.embedded_mode
        else (config.database.url.get_secret_value() if config.database.url else None)
    )
    key_dir = config.integrity.resolved_key_dir(
        embedded=config.embedded_mode, data_dir=config.embedded.data_dir
    )
    rotation = emergency.plan_rotate_all(env(cli), url=url, key_dir=key_dir)
    sink = FollowingAuditSink(rotation.current_url, cli.who) if rotation.current_url else None
    report = run_plan(ctx, rotation.plan, execute_it=execute_it or yes, dry_run=dry_run, yes=yes, audit=sink)
    if _report(report, rotation.plan):
        for note in rotation.plan.notes:
            typer.echo(f"Note: {note}")
        typer.echo("Credentials rotated.")
