"""Open the store the configuration points at: an external PostgreSQL, or the embedded one."""

from __future__ import annotations

from caracald.runtime.config import CaracalConfig
from caracald.store import embedded
from caracald.store.database import Database, PoolSizes
from caracald.store.migrate import migrate


def resolve_url(config: CaracalConfig) -> str:
    """The primary's URL; starts the embedded server when no URL is configured."""
    if config.database.url is not None:
        return config.database.url.get_secret_value()
    return embedded.start(config.embedded.data_dir).uri


def open_database(
    config: CaracalConfig, *, sizes: PoolSizes | None = None, auto_migrate: bool | None = None
) -> Database:
    """Connect, and bring the schema up to date when running embedded (or when asked to)."""
    url = resolve_url(config)
    if auto_migrate if auto_migrate is not None else config.embedded_mode:
        migrate(url)
    replica = config.database.read_replica_url
    db = Database(
        url,
        read_replica_url=replica.get_secret_value() if replica else None,
        sizes=sizes or PoolSizes(1, 4),
        connect_timeout=config.database.connect_timeout_seconds,
        statement_timeout_ms=config.database.statement_timeout_ms,
    )
    return db.open()


def daemon_pool_sizes(config: CaracalConfig) -> PoolSizes:
    """The runbook's ``pool_size`` persistent connections plus up to ``max_overflow`` more under load."""
    return PoolSizes(config.database.pool_size, config.database.pool_size + config.database.max_overflow)
