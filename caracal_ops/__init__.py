"""Caracal's operations toolkit: the ``caracal`` CLI and the runbook procedures behind it."""
