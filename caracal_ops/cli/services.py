"""``caracal services`` and ``caracal logs``: Caracal's daemons on the configured platform.

``platform.kind`` picks where they run: ``local`` (Caracal's own supervisor: background processes with pid
files and logs under the data folder, one replica each), ``systemd`` (the ``caracal-*.service`` units) or
``kubernetes`` (the ``caracal-*`` deployments in ``platform.namespace``).
"""

from __future__ import annotations

import typer

from caracal_ops.cli.context import CliState, state
from caracal_ops.cli.output import FORMAT_OPTION, OutputFormat, emit_json, emit_table
from caracal_ops.cli.procedures import run_plan
from caracal_ops.platform import COMPONENTS, Platform, component_name, platform_for
from caracal_ops.procedures import services as procedures
from caracal_ops.procedures.framework import Plan

app = typer.Typer(
    help="Start, stop and inspect Caracal's daemons (local supervisor, systemd or Kubernetes).",
    no_args_is_help=True,
)

COMPONENT_OPTION = typer.Option(
    [], "--component", "-c", help=f"Only this component ({', '.join(COMPONENTS)}); repeatable."
)


def daemon_env(cli: CliState) -> dict[str, str]:
    """What the local daemons need to see the CLI's own settings (``--config``, ``--database-url``,
    ``--data-dir``), through the environment: never on their command line."""
    env: dict[str, str] = {}
    if cli.config_path is not None:
        env["CARACAL_CONFIG"] = str(cli.config_path.expanduser().resolve())
    if cli.database_url:
        env["CARACAL_DATABASE_URL"] = cli.database_url
    if cli.data_dir is not None:
        env["CARACAL_DATA_DIR"] = str(cli.data_dir.expanduser().resolve())
    return env


def platform(cli: CliState) -> Platform:
    return platform_for(cli.config, env=daemon_env(cli))


def _run(ctx: typer.Context, plan: Plan) -> None:
    """Run the plan, then print what each step did and the plan's notes (components skipped)."""
    report = run_plan(ctx, plan)
    if report is None:
        return
    for step in report.steps:
        if step.summary:
            typer.echo(step.summary)
    for note in plan.notes:
        typer.echo(f"Note: {note}")


@app.command("up")
def up(ctx: typer.Context, component: list[str] = COMPONENT_OPTION) -> None:
    """Start the components (default: every one this platform can run)."""
    _run(ctx, procedures.plan_up(platform(state(ctx)), component))


@app.command("down")
def down(ctx: typer.Context, component: list[str] = COMPONENT_OPTION) -> None:
    """Stop the components (the gateway first, so that no new events arrive)."""
    _run(ctx, procedures.plan_down(platform(state(ctx)), component))


@app.command("restart")
def restart(ctx: typer.Context, component: list[str] = COMPONENT_OPTION) -> None:
    """Restart the components."""
    _run(ctx, procedures.plan_restart(platform(state(ctx)), component))


@app.command("scale")
def scale(
    ctx: typer.Context,
    component: str = typer.Option(..., "--component", "-c", help="The component."),
    replicas: int = typer.Option(..., "--replicas", min=0, help="How many (local and systemd run 0 or 1)."),
) -> None:
    """Scale a component (0 stops it).

    Kubernetes sets the deployment's replicas; the local platform and systemd
    run one instance per host, so any count above 0 starts that one.
    """
    _run(ctx, procedures.plan_scale(platform(state(ctx)), component, replicas))


@app.command("status")
def status(
    ctx: typer.Context, component: list[str] = COMPONENT_OPTION, fmt: OutputFormat = FORMAT_OPTION
) -> None:
    """Show whether each component runs, its replicas, and details (pid, unit state, pods)."""
    where = platform(state(ctx))
    names = [component_name(c) for c in component] or list(COMPONENTS)
    statuses = [where.status(name) for name in names]
    if fmt is OutputFormat.JSON:
        emit_json(
            {
                "platform": where.kind,
                "components": [
                    {
                        "component": s.component,
                        "state": s.state,
                        "replicas": s.replicas,
                        "ready": s.ready,
                        "detail": s.detail,
                    }
                    for s in statuses
                ],
            }
        )
        return
    typer.echo(f"Platform: {where.kind}")
    emit_table(
        ["component", "state", "ready", "detail"],
        [
            (
                s.component,
                s.state,
                f"{s.ready}/{s.replicas}" if s.replicas is not None else "-",
                s.detail or "",
            )
            for s in statuses
        ],
    )


def logs(
    ctx: typer.Context,
    component: str = typer.Option(..., "--component", "-c", help=f"One of {', '.join(COMPONENTS)}."),
    lines: int = typer.Option(100, "--lines", "-n", min=1, max=1_000_000, help="How many of the last lines."),
) -> None:
    """Print the last lines of a component's log (local log file, journalctl, or kubectl logs)."""
    text = platform(state(ctx)).logs(component_name(component), lines)
    typer.echo(text, nl=not text.endswith("\n"))
