"""Proof under fire: every drill against a real distributed deployment on this machine, then one table.

    .venv/bin/python bench/proof.py                  # every drill, about 21 minutes on 2 cores
    .venv/bin/python bench/proof.py --quick          # fewer rounds, kills and trials: about 10 minutes
    .venv/bin/python bench/proof.py --only concurrency,tamper

Starts PostgreSQL, Redis (append-only file on, as in production) and an Apache Kafka broker from the test
harness, then the deployment on the local platform: two gateway processes sharing their budgets in Redis and
sending events to Kafka, and the ledger writer, metrics aggregator and audit logger. The drills, in order:

* ``concurrency``: 1,000 calls at once on shared parent budgets and a hot one (bench/drills/concurrency.py);
* ``crash``: ``kill -9`` of every daemon, at random moments, under steady load (bench/drills/crash.py);
* ``outage``: Kafka, Redis and PostgreSQL each stopped for 30 s under load (bench/drills/outage.py);
* ``hostile``: malformed HTTP at the gateways and malformed records on the bus (bench/drills/hostile.py);
* ``tamper``: 1,000 random corruptions of a sealed ledger (bench/drills/tamper.py);
* ``throughput``: the performance figures, each beside a same-run baseline (bench/drills/throughput.py).

Prints the table (``--markdown FILE`` and ``--json FILE`` also write it) and exits 1 when an invariant broke,
0 otherwise; a missed performance target is shown, not fatal (it depends on the machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drills import env as drill_env  # noqa: E402
from bench.drills import report  # noqa: E402
from bench.drills.deployment import Deployment  # noqa: E402

DRILLS = ("concurrency", "crash", "outage", "hostile", "tamper", "throughput")
#: The drills that need the deployment (the others build what they need on the services).
ON_DEPLOYMENT = ("concurrency", "crash", "outage", "hostile")


def _drill(name: str, env: drill_env.DrillEnv, deployment: Deployment | None) -> list[report.Row]:
    quick = env.quick
    if name == "concurrency":
        from bench.drills import concurrency

        assert deployment is not None
        return concurrency.run(deployment, rounds=1 if quick else 3, seed=env.seed)
    if name == "crash":
        from bench.drills import crash

        assert deployment is not None
        return crash.run(deployment, kills_per_daemon=4 if quick else 20, seed=env.seed)
    if name == "outage":
        from bench.drills import outage

        assert deployment is not None
        return outage.run(deployment, seconds=10 if quick else 30, seed=env.seed)
    if name == "hostile":
        from bench.drills import hostile

        assert deployment is not None
        return hostile.run(deployment, quick=quick, seed=env.seed)
    if name == "tamper":
        from bench.drills import tamper

        return tamper.run(env)
    if name == "throughput":
        from bench.drills import throughput

        return throughput.run(env)
    raise ValueError(name)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load average {load:.1f} at the start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, kills and trials")
    parser.add_argument("--only", help=f"comma-separated drills among {', '.join(DRILLS)}")
    parser.add_argument(
        "--seed", type=int, default=int(time.time()), help="random choices (default: the time)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the rows here, as JSON")
    args = parser.parse_args(argv)
    chosen = [d.strip() for d in args.only.split(",")] if args.only else list(DRILLS)
    unknown = sorted(set(chosen) - set(DRILLS))
    if unknown:
        parser.error(f"unknown drill(s) {', '.join(unknown)}: choose among {', '.join(DRILLS)}")

    began = time.monotonic()
    print(f"seed {args.seed}; {machine()}", flush=True)
    env = drill_env.start(quick=args.quick, seed=args.seed)
    rows: list[report.Row] = []
    deployment: Deployment | None = None
    try:
        if any(d in ON_DEPLOYMENT for d in chosen):
            print("starting the deployment (local platform: 2 gateways, 3 consumers) ...", flush=True)
            deployment = Deployment(env).start()
        for name in DRILLS:
            if name not in chosen:
                continue
            if deployment is not None and name not in ON_DEPLOYMENT:
                # the later drills run gateways and writers of their own on the same topics: stop this one
                deployment.close()
                deployment = None
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                rows += _drill(name, env, deployment)
            except Exception as exc:  # one drill failing must not hide the others' results
                traceback.print_exc()
                rows.append(
                    report.invariant(name, "drill completed", f"{type(exc).__name__}: {exc}", False, "yes")
                )
            rows.append(report.info(name, "drill wall time", f"{time.monotonic() - started:.0f} s"))
    finally:
        if deployment is not None:
            deployment.close()
        env.close()
    rows.append(report.info("all", "total wall time", f"{time.monotonic() - began:.0f} s"))
    table = report.markdown(rows)
    print(f"\n{table}\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(report.to_json(rows) + "\n")
    broken = report.broken(rows)
    if broken:
        print(f"{len(broken)} invariant(s) BROKEN: " + "; ".join(f"{r.drill}: {r.measure}" for r in broken))
        return 1
    print("every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
