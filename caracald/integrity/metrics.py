"""Prometheus metrics of sealing and verification, with the names the runbook's alerts use.

They live in prometheus-client's default registry, like the consumers' metrics, so the process that seals
(the ledger writer) exposes them with its own.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES_CREATED = Counter(
    "caracal_merkle_batches_created_total",
    "Merkle batches sealed and signed.",
)
VERIFICATION_FAILURES = Counter(
    "caracal_merkle_verification_failures_total",
    "Verifications (of a batch, a time range, an event or a proof) that found the ledger tampered with.",
)
BATCH_PROCESSING_DURATION = Histogram(
    "caracal_merkle_batch_processing_duration_seconds",
    "Seconds to seal one batch: read its events, hash, extend the tree, sign and store.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
TREE_SIZE = Gauge(
    "caracal_merkle_tree_size",
    "Events sealed into the Merkle tree, as of the last batch this process sealed.",
)
