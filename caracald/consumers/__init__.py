"""Consumer daemons: the ledger writer, the metrics aggregator and the audit logger, and DLQ handling.

* :mod:`~caracald.consumers.ledger_writer` -- metering events into the ledger (its own pipelined loop);
* :mod:`~caracald.consumers.metrics_aggregator`, :mod:`~caracald.consumers.audit_logger` -- on the shared
  loop of :mod:`~caracald.consumers.runner`;
* :mod:`~caracald.consumers.daemons` -- building them from the configuration (``caracald <consumer>``, and
  in process for ``caracald up``); :mod:`~caracald.consumers.sealing` -- the ledger writer's Merkle sealing;
* :mod:`~caracald.consumers.dlq`, :mod:`~caracald.consumers.metrics` -- dead letters and Prometheus metrics.

See docs/event-pipeline.md.
"""
