"""Proof under fire: load, fault, tamper and hostile-input drills against a real distributed deployment.

``bench/proof.py`` runs them all and prints one table; each module here is one drill (``run(env)`` returns
its rows of that table). :mod:`bench.drills.report` is the table, :mod:`bench.drills.env` the services and
the throw-away databases, :mod:`bench.drills.deployment` the gateways and consumers on the local platform.
"""
