"""Changes a front end (the TUI) makes, each through the same administrative use case the CLI calls, so it is
validated and audited the same way whichever door it comes through. The actor is the front end's user
(``--actor``, ``CARACAL_ACTOR`` or the OS user), as for the CLI.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from caracal_ops.cli.context import CliState
from caracal_ops.inventory import key_dir, optional_module
from caracald.admin import agents as agent_admin
from caracald.admin import policies as policy_admin
from caracald.core.agents import Agent, AgentStatus
from caracald.core.policy import PolicyVersion


def set_agent_status(
    state: CliState, agent_id: uuid.UUID, *, suspend: bool, reason: str | None
) -> tuple[Agent, bool]:
    """Suspend or reactivate an agent (``caracal agent suspend|activate``). Returns the agent and whether
    anything changed."""
    status = AgentStatus.SUSPENDED if suspend else AgentStatus.ACTIVE
    return agent_admin.set_status(state.db, agent_id, status, actor=state.who, reason=reason or None)


def change_policy_limit(state: CliState, policy_id: uuid.UUID, limit: str, reason: str) -> PolicyVersion:
    """A new version of the policy with a new limit (``caracal policy change``)."""
    return policy_admin.change_policy(state.db, policy_id, limit=limit, change_reason=reason, actor=state.who)


@dataclass(frozen=True, slots=True)
class RotatedKey:
    key_name: str
    key_id: str
    retired_name: str | None
    retired_id: str | None


def rotate_signing_key(state: CliState, reason: str | None) -> RotatedKey:
    """Replace the ledger's signing key by a new one (``caracal merkle rotate-keys``)."""
    keys = optional_module("caracald.integrity.keys", "signing key rotation")
    new = keys.rotate(state.db, key_dir(state), actor=state.who, reason=reason or None)
    retired = new.retired
    return RotatedKey(
        key_name=new.key.name,
        key_id=new.key.key_id_hex,
        retired_name=retired.name if retired else None,
        retired_id=retired.key_id_hex if retired else None,
    )


# --------------------------------------------------------------------------- procedures
#
# The operations below are the ops toolkit's procedures (caracal_ops.procedures): each returns a Plan of
# named steps, run by the framework with progress and an audit trail, exactly as the CLI runs them.


def _daemon_env(state: CliState) -> dict[str, str]:
    """What the local daemons need to see the front end's settings (as ``caracal services`` passes them)."""
    env: dict[str, str] = {}
    if state.config_path is not None:
        env["CARACAL_CONFIG"] = str(state.config_path.expanduser().resolve())
    if state.database_url:
        env["CARACAL_DATABASE_URL"] = state.database_url
    if state.data_dir is not None:
        env["CARACAL_DATA_DIR"] = str(state.data_dir.expanduser().resolve())
    return env


def _platform(state: CliState) -> Any:
    platform = optional_module("caracal_ops.platform", "service control")
    return platform.platform_for(state.config, env=_daemon_env(state))


def _audit_sink(state: CliState) -> Any:
    audit = optional_module("caracal_ops.procedures.audit", "audited procedures")
    return audit.DatabaseAuditSink(lambda: state.db.url, state.who)


def plan_backup(state: CliState, tag: str | None = None) -> Any:
    """``caracal backup create --type postgresql``."""
    backup = optional_module("caracal_ops.procedures.backup", "backups")
    env = backup.BackupEnv(
        config=state.config,
        actor=state.who,
        database_url=lambda: state.db.url,
        platform=lambda: _platform(state),
    )
    return backup.plan_create(env, kind="postgresql", tag=tag or None)


def plan_snapshot(state: CliState) -> Any:
    """``caracal snapshot create``: the ledger's totals, hashed, in the database and the snapshot folder."""
    snapshots = optional_module("caracal_ops.procedures.snapshot", "snapshots")
    framework = optional_module("caracal_ops.procedures.framework", "audited procedures")
    directory = snapshots.snapshot_dir(state.config)
    title = "Take a snapshot of the ledger's totals"
    plan = framework.Plan("snapshot.create", title, confirm_word="snapshot")

    def take(step: Any) -> str:
        info = snapshots.create_snapshot(state.db, actor=state.who, directory=directory)
        step.result["snapshot_id"] = str(info.snapshot_id)
        return f"snapshot {info.snapshot_id}: {info.total_events:,} events up to event {info.last_event_id}"

    plan.add("snapshot", f"Record the totals up to the last ledger event, with a copy in {directory}", take)
    return plan


def plan_replay(state: CliState, *, since: datetime, group: str) -> Any:
    """``caracal replay start``: move ``group``'s committed offsets back to ``since``."""
    replay = optional_module("caracal_ops.procedures.replay", "replay")
    env = replay.ReplayEnv(config=state.config, database_url=lambda: state.db.url, actor=state.who)
    plan, _moves = replay.plan_start(env, group=group, from_timestamp=since)
    return plan


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    lag: int
    replayed: int | None
    progress: float | None  # 0..1 of what the last replay rewound over


def replay_progress(state: CliState, group: str) -> ReplayProgress | None:
    """How far ``group`` is with re-reading (``caracal replay status``), or None when nothing is known."""
    replay = optional_module("caracal_ops.procedures.replay", "replay")
    env = replay.ReplayEnv(config=state.config, database_url=lambda: state.db.url, actor=state.who)
    found = [g for g in replay.status(env, group) if g.group == group]
    if not found:
        return None
    progress = found[0]
    replayed = sum((p.replayed or 0) for p in progress.partitions)
    return ReplayProgress(progress.lag, replayed, progress.progress)


def _emergency_env(state: CliState) -> Any:
    emergency = optional_module("caracal_ops.procedures.emergency", "emergency procedures")
    return emergency, emergency.EmergencyEnv(
        config=state.config,
        actor=state.who,
        db=lambda: state.db,
        platform=lambda: _platform(state),
        audit=lambda: _audit_sink(state),
    )


def plan_stop_writes(state: CliState, reason: str) -> Any:
    """``caracal emergency stop-writes``: deny-all on, then stop the gateway and the ledger writer."""
    emergency, env = _emergency_env(state)
    return emergency.plan_stop_writes(env, reason=reason)


def plan_resume_writes(state: CliState) -> Any:
    """``caracal emergency resume-writes``: start what stop-writes stopped, then deny-all off."""
    emergency, env = _emergency_env(state)
    return emergency.plan_resume_writes(env)


def _dlq_env(state: CliState) -> Any:
    dlq = optional_module("caracal_ops.procedures.dlq", "dead letter triage")
    return dlq, dlq.DlqEnv(config=state.config, database_url=lambda: state.db.url, actor=state.who)


def plan_dlq_retry(state: CliState, dlq_ids: list[int]) -> Any:
    """``caracal dlq retry --event-id ...``: re-produce the records to their topics, mark them redriven."""
    dlq, env = _dlq_env(state)
    return dlq.plan_retry(env, event_ids=[str(i) for i in dlq_ids])


def plan_dlq_purge(state: CliState, dlq_ids: list[int]) -> Any:
    """``caracal dlq purge --event-id ...``: mark them purged (kept for the record, never applied)."""
    dlq, env = _dlq_env(state)
    return dlq.plan_purge(env, event_ids=[str(i) for i in dlq_ids])


def run_procedure(state: CliState, plan: Any, progress: Callable[[Any], None]) -> Any:
    """Run a procedure's plan as the CLI does: audited as the acting user, progress through ``progress``.

    Raises the framework's ProcedureError (a Caracal error naming the failed step and the state it left)."""
    framework = optional_module("caracal_ops.procedures.framework", "audited procedures")
    return framework.execute(plan, actor=state.who, audit=_audit_sink(state), progress=progress)
