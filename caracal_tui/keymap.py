"""Every key of the dashboard, as data: the screens build their bindings from it, the help screen (``?``) is
generated from it, and ``--readonly`` hides the keys of actions that change something.

The habits are k9s's: ``:`` jumps to a view, ``/`` filters, ``?`` shows the keys, ``esc`` goes back,
``r`` refreshes; ``ctrl+p`` opens the command palette.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding, BindingType


@dataclass(frozen=True, slots=True)
class View:
    id: str
    title: str
    key: str  # the digit that jumps to it
    aliases: tuple[str, ...]


VIEWS: tuple[View, ...] = (
    View("overview", "Overview", "1", ("ov", "home", "health")),
    View("agents", "Agents and budgets", "2", ("ag", "agent", "budgets", "bu")),
    View("ledger", "Ledger", "3", ("le", "led", "spend")),
    View("dlq", "DLQ triage", "4", ("dead", "deadletters", "dl")),
    View("integrity", "Integrity", "5", ("in", "merkle", "verify")),
    View("operations", "Operations", "6", ("op", "ops")),
)
VIEW_BY_ID = {view.id: view for view in VIEWS}


def find_view(text: str) -> View | None:
    """A view by id, alias, title or digit (``:agents``, ``:ag``, ``:2``), or by a unique prefix."""
    wanted = text.strip().lstrip(":").lower()
    if not wanted:
        return None
    for view in VIEWS:
        if wanted in (view.id, view.key, view.title.lower(), *view.aliases):
            return view
    matches = [v for v in VIEWS if v.id.startswith(wanted) or v.title.lower().startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True, slots=True)
class Key:
    key: str  # Textual's key name(s), comma separated
    action: str
    description: str
    scope: str  # "global", or the screen it belongs to
    group: str  # the help screen's section
    display: str | None = None
    show: bool = True  # shown in the footer
    changes: bool = False  # changes something: hidden with --readonly
    priority: bool = False


KEYS: tuple[Key, ...] = (
    # everywhere
    Key("question_mark", "app.help", "Help", "global", "General", display="?"),
    Key("colon", "app.jump", "Jump", "global", "General", display=":"),
    Key("r", "app.refresh", "Refresh", "global", "General"),
    Key("ctrl+p", "app.command_palette", "Palette", "global", "General", display="^p", show=False),
    Key("escape", "app.back", "Back", "global", "General", display="esc", show=False),
    Key("q", "app.quit", "Quit", "global", "General", show=False),
    *(Key(view.key, f"app.view('{view.id}')", view.title, "global", "Views", show=False) for view in VIEWS),
    # lists with a filter
    Key("slash", "filter", "Filter", "agents", "Lists", display="/"),
    Key("slash", "filter", "Filter", "dlq", "Lists", display="/"),
    Key("slash", "filter", "Filter", "ledger", "Lists", display="/"),
    Key("slash", "filter", "Filter", "integrity", "Lists", display="/"),
    # agents and budgets
    Key("enter", "open", "Open", "agents", "Agents", display="enter"),
    Key("s", "act('agent.suspend')", "Suspend", "agents", "Agents", changes=True),
    Key("a", "act('agent.activate')", "Activate", "agents", "Agents", changes=True),
    Key("s", "act('agent.suspend')", "Suspend", "agent", "Agent", changes=True),
    Key("a", "act('agent.activate')", "Activate", "agent", "Agent", changes=True),
    Key("l", "act('policy.change-limit')", "Limit", "agent", "Agent", changes=True),
    Key("L", "ledger", "Ledger", "agent", "Agent", display="L"),
    # ledger
    Key("e", "edit_query", "Query", "ledger", "Ledger"),
    # dead letters
    Key("enter", "inspect", "Inspect", "dlq", "Dead letters", display="enter"),
    Key("t", "act('dlq.retry')", "Retry", "dlq", "Dead letters", changes=True),
    Key("x", "act('dlq.purge')", "Purge", "dlq", "Dead letters", changes=True),
    # integrity
    Key("v", "act('integrity.verify-batch')", "Verify", "integrity", "Integrity"),
    Key("g", "act('integrity.verify-range')", "Range", "integrity", "Integrity"),
    # operations
    Key("enter", "run_selected", "Run", "operations", "Operations", display="enter", changes=True),
)


def keys_for(scope: str) -> list[Key]:
    return [k for k in KEYS if k.scope == scope]


def _local(action: str) -> str:
    return action.removeprefix("app.")


def bindings(scope: str) -> list[BindingType]:
    """Textual bindings of a scope (the app's for ``global``)."""
    out: list[BindingType] = []
    for key in keys_for(scope):
        action = _local(key.action) if scope == "global" else key.action
        out.append(
            Binding(
                key.key,
                action,
                key.description,
                show=key.show,
                key_display=key.display,
                priority=key.priority,
            )
        )
    return out


def changing_actions() -> frozenset[str]:
    """Action names (as bound) that change something."""
    return frozenset(_local(k.action) for k in KEYS if k.changes)


def help_sections(scope: str, *, readonly: bool) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(section, [(key, description), ...]), ...]`` for the screen ``scope``, then the global keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for key in [*keys_for(scope), *keys_for("global")]:
        if readonly and key.changes:
            continue
        label = key.display or key.key
        sections.setdefault(key.group, []).append((label, key.description))
    return list(sections.items())
