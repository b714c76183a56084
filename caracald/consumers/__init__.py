"""Consumer daemons: the ledger writer (later the metrics aggregator and the audit logger), DLQ handling."""
