"""A fingerprint of the agents and policies tables: has anything in them changed since it was taken?"""

from __future__ import annotations

from caracald.store.database import Connection


def fingerprint(conn: Connection) -> tuple[int, int]:
    """``(rows, row versions)`` over agents, policies and policy versions.

    Every insert and update writes a row version with a new transaction id (``xmin``), and a delete lowers
    the count, so any change to the three tables, by any path, changes the pair. A scan of a few thousand
    short rows: far cheaper than reading and validating them.
    """
    row = conn.execute(
        """
        SELECT count(*) AS rows, COALESCE(sum(xmin::text::bigint), 0) AS versions
          FROM (SELECT xmin FROM agents
                UNION ALL SELECT xmin FROM policies
                UNION ALL SELECT xmin FROM policy_versions) t
        """
    ).fetchone()
    assert row is not None
    return int(row["rows"]), int(row["versions"])
