"""PostgreSQL store: connection pools, forward-only migrations, one repository module per aggregate."""
