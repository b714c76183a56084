"""Atomic budget reservation: Redis scripts when distributed, in process when embedded."""
