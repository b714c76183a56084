"""Caracal's engine: the domain core, the store, the gateway and the consumer daemons."""

__version__ = "0.3.0"
