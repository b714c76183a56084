"""Procedure audit records in Caracal's hash-chained audit log (``ops_procedure`` events)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from caracald.admin.common import audit
from caracald.core.audit import AuditEventType
from caracald.core.errors import StoreUnavailableError


class DatabaseAuditSink:
    """Appends each record in its own short transaction, on a fresh connection.

    A fresh connection per record (procedures write a handful) keeps no session across steps that may
    replace the whole database, as a restore does. ``url`` is called on first use, so a plan that fails
    before its first record never starts the embedded server for nothing.
    """

    def __init__(self, url: Callable[[], str], actor: str, *, connect_timeout: int = 5) -> None:
        self._url = url
        self._resolved: str | None = None
        self.actor = actor
        self._connect_timeout = connect_timeout

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None:
        if self._resolved is None:
            self._resolved = self._url()
        try:
            with (
                psycopg.connect(
                    self._resolved, row_factory=dict_row, connect_timeout=self._connect_timeout
                ) as conn,
                conn.transaction(),
            ):
                audit(
                    conn,
                    actor=self.actor,
                    event_type=AuditEventType.OPS_PROCEDURE,
                    action=action,
                    at=at,
                    subject_id=subject_id,
                    reason=reason,
                    details=details,
                )
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailableError(f"PostgreSQL is unavailable: {first}") from None
