"""python -m bench.hardening [scenario ...] [--full] [--work DIR] [--json FILE]: run, print figures, exit 1
on any failure."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.hardening.world import build_world

SCENARIOS = ("churn", "storm", "overload", "hot_swap", "faults", "drain")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--full", action="store_true", help="issue 13's sizes (minutes); default: CI's short ones")
    parser.add_argument("--work", type=Path, help="tiny model, adapters, server logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every report here")
    args = parser.parse_args()
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work or Path(tempfile.mkdtemp(prefix="loraserve-hardening-"))
    world = build_world(work)
    print(f"world: {work} ({'full' if args.full else 'quick'} sizes; {platform.node()}, {os.cpu_count()} CPUs)")
    reports = []
    try:
        for name in args.scenarios or SCENARIOS:
            module = importlib.import_module(f"bench.hardening.{name}")
            report = module.run(world, module.FULL if args.full else module.QUICK)
            print("\n".join(report.lines()), flush=True)
            reports.append(report)
    finally:
        world.stop_all()
    if args.json:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        args.json.write_text(json.dumps({"at": stamp, "reports": [asdict(r) for r in reports]}, indent=1, default=str))
    return 1 if any(r.failures for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
