"""Ledger integrity: canonical event bytes, sealing into signed Merkle batches, verification and proofs.

* :mod:`~caracald.integrity.encoding` -- the canonical bytes of a ledger event (docs/ledger-encoding.md);
* :mod:`~caracald.integrity.keys` -- signing key files, their public halves in ``merkle_keys``, rotation;
* :mod:`~caracald.integrity.sealer` -- ``seal_pending``: unsealed events into signed, chained batches;
* :mod:`~caracald.integrity.verifier` -- verify a batch, a time range, one event, a trusted checkpoint;
* :mod:`~caracald.integrity.proofs` -- inclusion and consistency proofs as JSON, checked offline;
* :mod:`~caracald.integrity.metrics` -- the Prometheus metrics the runbook names.
"""
