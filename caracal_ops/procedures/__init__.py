"""Operational procedures: backup and restore today; snapshot, replay, rotation and emergency next.

Each procedure builds a :class:`~caracal_ops.procedures.framework.Plan` (its steps, which of them are
destructive) that can be printed as a dry run or executed with progress reporting and an audit trail.
"""
