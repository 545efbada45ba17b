#!/usr/bin/env python3
"""Ranges over several `scripts/bench --out FILE` runs: the README's performance tables.

    python3 bench/summarize.py run1.jsonl run2.jsonl run3.jsonl

Per target and session count: CPU per message and its ratios to nginx and floor (each
ratio taken within one run, then the range over the runs), the target's CPU %, RTT p50 and
p99, how many runs kept up, and the load generator's CPU on core 1. Then, from the idle
measurement: KiB per idle session, set-ups per second and CPU per set-up, with ratios.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

from report import ORDER  # bench/report.py: one order of targets for both tables

DASH = "\u2013"  # en dash, as in the README's ranges


def span(values: list[float | None], spec: str = ".1f") -> str:
    """'a-b' (en dash) over the values (one figure when both ends print the same)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = format(min(vals), spec), format(max(vals), spec)
    return lo if lo == hi else f"{lo}{DASH}{hi}"


def over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def per_msg(row: dict[str, Any] | None) -> float | None:
    return row["cpu"]["target"]["us_per_msg"] if row else None


def load(paths: list[str]) -> tuple[dict[Any, list[dict[str, Any]]], dict[str, list[Any]]]:
    points: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    idle: dict[str, list[Any]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        idle_rows = {r["target"]: r for r in rows if r.get("kind") == "idle"}
        by_point = {(r["target"], r["sessions"]): r for r in rows if r.get("kind") != "idle"}
        for r in idle_rows.values():
            idle[r["target"]].append((r, idle_rows))
        for (target, n), r in by_point.items():
            us = per_msg(r)
            points[(target, n)].append({
                "us": us,
                "x_nginx": over(us, per_msg(by_point.get(("nginx", n)))),
                "x_floor": over(us, per_msg(by_point.get(("floor", n)))),
                "pct": r["cpu"]["target"]["cpu_pct"],
                "p50": r["rtt_p50_ms"],
                "p99": r["rtt_p99_ms"],
                "ok": r["keeps_up"],
                "harness": r["loadgen_cpu_pct"],
            })
    return points, idle


def print_points(points: dict[Any, list[dict[str, Any]]]) -> None:
    cols = ("CPU us/msg", "x nginx", "x floor", "CPU %", "p50 ms", "p99 ms")
    print(f"{'target':7s}{'sess':>5s} " + " ".join(f"{c:>11s}" for c in cols)
          + "  keeps up  harness %")
    for (target, n), runs in sorted(points.items(), key=lambda k: (ORDER.get(k[0][0], 9), k[0][1])):
        def col(key: str, spec: str = ".1f", runs: list[dict[str, Any]] = runs) -> str:
            return f"{span([r[key] for r in runs], spec):>11s}"

        kept = f"{sum(r['ok'] for r in runs)}/{len(runs)}"
        print(f"{target:7s}{n:5d} {col('us')} {col('x_nginx', '.2f')} {col('x_floor', '.2f')} "
              f"{col('pct', '.0f')} {col('p50', '.2f')} {col('p99')}  {kept:>8s}  "
              f"{span([r['harness'] for r in runs], '.0f'):>9s}")


def print_idle(idle: dict[str, list[Any]]) -> None:
    cols = ("KiB/session", "set-ups/s", "x nginx", "x floor", "CPU us/set-up", "x nginx",
            "harness %")
    print(f"{'target':7s} " + " ".join(f"{c:>13s}" for c in cols))
    for target in sorted(idle, key=lambda t: ORDER.get(t, 9)):
        runs = idle[target]

        def ratio(key: str, ref: str, runs: list[Any] = runs) -> list[float | None]:
            return [over(r[key], (all_.get(ref) or {}).get(key)) for r, all_ in runs]

        cells = (
            span([r["kib_per_session"] for r, _ in runs]),
            span([r["setups_per_s"] for r, _ in runs], ".0f"),
            span(ratio("setups_per_s", "nginx"), ".2f"),
            span(ratio("setups_per_s", "floor"), ".2f"),
            span([r["cpu_us_per_setup"] for r, _ in runs], ".0f"),
            span(ratio("cpu_us_per_setup", "nginx"), ".1f"),
            span([r.get("harness_cpu_pct") for r, _ in runs], ".0f"),
        )
        print(f"{target:7s} " + " ".join(f"{c:>13s}" for c in cells))


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    points, idle = load(paths)
    print_points(points)
    if idle:
        print()
        print_idle(idle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
