"""The catalogue of what the dashboard can do, as data: each action's palette name, what it needs the operator
to select and type, and whether it changes something (then it shows its plan, asks for a typed confirmation,
and is hidden with ``--readonly``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InputField:
    name: str
    label: str
    placeholder: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class ActionSpec:
    action: str  # "agent.suspend"
    group: str  # the palette's group: "agents: suspend agent"
    title: str
    description: str
    changes: bool
    target: str = ""  # what must be selected first: agent, policy, dead letter, batch
    fields: tuple[InputField, ...] = ()

    @property
    def palette_name(self) -> str:
        return f"{self.group}: {self.title}"


REASON = InputField("reason", "Reason (for the audit log)", "why")
REQUIRED_REASON = InputField("reason", "Reason (for the audit log)", "why", required=True)

CATALOGUE: tuple[ActionSpec, ...] = (
    ActionSpec(
        "agent.suspend",
        "agents",
        "suspend agent",
        "Refuse every request of the selected agent until it is activated again",
        changes=True,
        target="agent",
        fields=(REASON,),
    ),
    ActionSpec(
        "agent.activate",
        "agents",
        "activate agent",
        "Let the selected suspended agent make requests again",
        changes=True,
        target="agent",
        fields=(REASON,),
    ),
    ActionSpec(
        "policy.change-limit",
        "policies",
        "change limit",
        "Write a new version of the selected policy with a new limit",
        changes=True,
        target="policy",
        fields=(InputField("limit", "New limit", "e.g. 250.00", required=True), REQUIRED_REASON),
    ),
    ActionSpec(
        "dlq.retry",
        "dlq",
        "retry dead letter",
        "Send the selected dead letter back to its topic for its consumer to apply again",
        changes=True,
        target="dead letter",
    ),
    ActionSpec(
        "dlq.purge",
        "dlq",
        "purge dead letter",
        "Mark the selected dead letter purged: it will not be applied",
        changes=True,
        target="dead letter",
    ),
    ActionSpec(
        "integrity.verify-batch",
        "integrity",
        "verify batch",
        "Check the selected Merkle batch: signature, chain and every event",
        changes=False,
        target="batch",
    ),
    ActionSpec(
        "integrity.verify-range",
        "integrity",
        "verify range",
        "Check every batch holding events of a time range, and that none was left out",
        changes=False,
        fields=(
            InputField("start", "From (ISO 8601, or e.g. -24h)", "-24h", required=True),
            InputField("end", "To (ISO 8601, or now)", "now"),
        ),
    ),
    ActionSpec(
        "integrity.rotate-key",
        "operations",
        "rotate signing key",
        "Replace the ledger's signing key by a new one; the old public key stays trusted",
        changes=True,
        fields=(REASON,),
    ),
    ActionSpec(
        "ops.backup",
        "operations",
        "back up now",
        "Dump the database to the backup folder and check the dump",
        changes=True,
    ),
    ActionSpec(
        "ops.snapshot",
        "operations",
        "take snapshot",
        "Record a consistent snapshot of budgets and ledger position",
        changes=True,
    ),
    ActionSpec(
        "ops.replay",
        "operations",
        "replay events",
        "Re-read the metering events from the bus into the ledger (idempotent)",
        changes=True,
        fields=(
            InputField("since", "Replay from (ISO 8601, or e.g. -1h)", "-1h", required=True),
            InputField("group", "Consumer group", "ledger-writer-group"),
        ),
    ),
    ActionSpec(
        "ops.stop-writes",
        "operations",
        "emergency stop-writes",
        "Switch the gateway to deny every request (deny-all), at once, on every replica",
        changes=True,
        fields=(REQUIRED_REASON,),
    ),
    ActionSpec(
        "ops.resume-writes",
        "operations",
        "resume writes",
        "Turn the deny-all switch off: the gateway decides requests again",
        changes=True,
    ),
)

BY_ACTION = {spec.action: spec for spec in CATALOGUE}

#: What the Operations view lists, in order.
OPERATIONS: tuple[str, ...] = (
    "ops.backup",
    "ops.snapshot",
    "ops.replay",
    "integrity.rotate-key",
    "ops.stop-writes",
    "ops.resume-writes",
)


def spec(action: str) -> ActionSpec:
    return BY_ACTION[action]
