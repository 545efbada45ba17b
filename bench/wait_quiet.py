#!/usr/bin/env python3
"""Wait (bounded) until cores 0 and 1 are nearly idle, so a benchmark point is not disturbed
by unrelated processes on this machine. Exit 0 when quiet, 1 when --max seconds passed."""

import argparse
import sys
import time


def sample() -> dict[str, tuple[int, int]]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            out[name] = (sum(v) - v[3] - v[4], sum(v))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=float, default=20.0, help="give up after S seconds")
    ap.add_argument("--threshold", type=float, default=15.0, help="busy %% per core")
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.max
    busy: dict[str, float] = {}
    while True:
        a = sample()
        time.sleep(args.interval)
        b = sample()
        busy = {
            k: 100 * (b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1])
            for k in b
            if k in ("cpu0", "cpu1") and k in a
        }
        if all(v < args.threshold for v in busy.values()):
            return 0
        if time.monotonic() >= deadline:
            desc = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(busy.items()))
            print(f"machine still busy ({desc}); measuring anyway", file=sys.stderr)
            return 1
        if time.monotonic() + args.interval > deadline:
            continue


if __name__ == "__main__":
    sys.exit(main())
