#!/usr/bin/env python3
"""Print the side-by-side table for `scripts/bench` from its JSON-lines results.

Each line is one loadgen result plus "target" (direct | relay | floor | nginx), "search"
(whether the point belongs to the max-sessions search) and "harness_cores"
(which CPU the load generator and the echo bot ran on); or, with "kind": "idle", one
`bench/idle.py` result (RSS per idle session, set-ups per second) for a target.

"floor" is bench/trio_floor.py, a minimal Trio relay of the gateway's shape: the table gives
relay's figures over floor's ("x floor") next to the ones over nginx's.
"""

from __future__ import annotations

import json
import sys
from typing import Any

HARNESS_BUSY = 90.0  # % of a core: above this the load generator core is the bottleneck
TARGET_BUSY = 90.0
FOREIGN_MAX = 10.0  # % of a core used by unrelated processes: above this a point is disturbed
ORDER = {"direct": 0, "relay": 1, "floor": 2, "uvloop": 3, "nginx": 4}


def load(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def verdict(r: dict[str, Any]) -> str:
    if r["keeps_up"]:
        return "yes"
    if foreign_pct(r) > FOREIGN_MAX:
        return "no~"
    if limited_by_harness(r):
        return "no*"
    return "no"


def target_cpu(r: dict[str, Any]) -> dict[str, Any]:
    return r.get("cpu", {}).get("target") or {}


def harness_pct(r: dict[str, Any]) -> float:
    """CPU% our harness used on core 1: loadgen, plus the echo bot unless it is the target."""
    total = r.get("loadgen_cpu_pct") or 0.0
    if r["target"] != "direct":
        total += (r.get("cpu", {}).get("bot") or {}).get("cpu_pct") or 0.0
    return total


def core_busy(r: dict[str, Any], core: str) -> float | None:
    return (r.get("core_busy_pct") or {}).get(core)


def foreign_pct(r: dict[str, Any]) -> float:
    """Largest CPU% on core 0 or 1 used by processes that are not part of this benchmark."""
    ours = {"cpu0": target_cpu(r).get("cpu_pct") or 0.0, "cpu1": harness_pct(r)}
    worst = 0.0
    for core, mine in ours.items():
        busy = core_busy(r, core)
        if busy is not None:
            worst = max(worst, busy - mine)
    return worst


def limited_by_harness(r: dict[str, Any]) -> bool:
    """Failed while core 1 (loadgen + bot, or someone else) was saturated and the target not."""
    if r["keeps_up"]:
        return False
    t = target_cpu(r).get("cpu_pct") or 0.0
    c1 = core_busy(r, "cpu1")
    h = c1 if c1 is not None else harness_pct(r)
    return h >= HARNESS_BUSY and t < TARGET_BUSY


def est_max(r: dict[str, Any]) -> str:
    """Sessions at which the target would use a full core, if its CPU scales linearly."""
    c = target_cpu(r).get("cpu_pct")
    if not c or not r.get("msgs_per_s"):
        return "-"
    per_session = r["msgs_per_s"] / r["sessions"]
    return str(int(r["sessions"] * 100 / c * per_session / r["rate_per_session"]))


def print_idle(idle: list[dict[str, Any]]) -> None:
    """RSS per idle session and set-ups per second, each over nginx's and over floor's."""
    ref = {t: next((r for r in idle if r["target"] == t), None) for t in ("nginx", "floor")}

    def ratio(a: float | None, key: str, other: str) -> str:
        o = ref[other]
        b = o.get(key) if o else None
        return f"{a / b:.2f}" if a and b else "-"

    print(f"{'target':7s} {'idle sessions':>13s} {'KiB/session':>11s} {'x nginx':>7s} "
          f"{'x floor':>7s} {'set-ups/s':>9s} {'x nginx':>7s} {'x floor':>7s} "
          f"{'CPU us/set-up':>13s} {'x nginx':>7s} {'harness%':>8s} {'failed':>6s}")
    for r in sorted(idle, key=lambda r: ORDER.get(r["target"], 9)):
        kib, ups, cpu = r.get("kib_per_session"), r.get("setups_per_s"), r.get("cpu_us_per_setup")
        print(f"{r['target']:7s} {r['sessions']:13d} {fmt(kib, '.1f'):>11s} "
              f"{ratio(kib, 'kib_per_session', 'nginx'):>7s} "
              f"{ratio(kib, 'kib_per_session', 'floor'):>7s} {fmt(ups, '.0f'):>9s} "
              f"{ratio(ups, 'setups_per_s', 'nginx'):>7s} "
              f"{ratio(ups, 'setups_per_s', 'floor'):>7s} {fmt(cpu, '.0f'):>13s} "
              f"{ratio(cpu, 'cpu_us_per_setup', 'nginx'):>7s} "
              f"{fmt(r.get('harness_cpu_pct'), '.0f'):>8s} {r.get('failed', 0):6d}")
    print("KiB/session: (target RSS with N idle sessions open - RSS with none) / N, fresh")
    print("process. set-ups/s: N upgrades (<= 32 in flight) / time until all were answered;")
    print("a CPU-bound figure: compare it with nginx's in the same run, on quiet cores only.")
    print("CPU us/set-up: the target's CPU (10 ms ticks) while the N were opened, over N.")
    print("harness%: idle.py's own CPU then (it is the bot too). Near 100 it may cap the")
    print("rate; CPU us/set-up does not depend on it: the fairer ratio.")
    print("x floor: over bench/trio_floor.py's, the least this design costs (bench/README.md).")


def print_over_floor(rows: list[dict[str, Any]], idle: list[dict[str, Any]]) -> None:
    """relay's figures over floor's (and both over nginx's), all from this run."""
    def q(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    out = []
    by = {(r["target"], r["sessions"]): r for r in rows}
    for n in sorted({r["sessions"] for r in rows if r["target"] == "relay"}):
        relay, floor, nginx = (by.get((t, n)) for t in ("relay", "floor", "nginx"))
        if relay is None or floor is None:
            continue
        a, b = target_cpu(relay).get("us_per_msg"), target_cpu(floor).get("us_per_msg")
        c = target_cpu(nginx).get("us_per_msg") if nginx else None
        out.append(f"  {n} sessions: CPU us/msg {fmt(a)} / {fmt(b)} = {q(a, b)} "
                   f"(x nginx {q(a, c)} / {q(b, c)}); RTT p99 ms "
                   f"{fmt(relay.get('rtt_p99_ms'))} / {fmt(floor.get('rtt_p99_ms'))}")
    ups = {r["target"]: r.get("setups_per_s") for r in idle}
    if ups.get("relay") and ups.get("floor"):
        a, b, c = ups["relay"], ups["floor"], ups.get("nginx")
        out.append(f"  set-ups/s: {fmt(a, '.0f')} / {fmt(b, '.0f')} = {q(a, b)} "
                   f"(x nginx {q(a, c)} / {q(b, c)})")
    if out:
        print()
        print("relay / floor, this run (floor: bench/trio_floor.py, the least this design costs):")
        print("\n".join(out))


def main() -> int:
    rows = load(sys.argv[1])
    idle = [r for r in rows if r.get("kind") == "idle"]
    rows = [r for r in rows if r.get("kind") != "idle"]
    if idle:
        print_idle(idle)
        print()
    if not rows:
        print("no results")
        print_over_floor(rows, idle)
        return 1
    by = {(r["target"], r["sessions"]): r for r in rows}

    def rss(r: dict[str, Any]) -> float | None:
        kib = target_cpu(r).get("rss_kib")
        return kib / 1024 if kib else None

    def mem_ratio(r: dict[str, Any], other: str) -> str:
        o = by.get((other, r["sessions"]))
        a, b = rss(r), (rss(o) if o else None)
        return f"{a / b:.1f}" if a and b else "-"

    def ratio(r: dict[str, Any], other: str) -> str:
        o = by.get((other, r["sessions"]))
        a = target_cpu(r).get("us_per_msg")
        b = target_cpu(o).get("us_per_msg") if o else None
        if not a or not b:
            return "-"
        return f"{a / b:.2f}"

    cols = [
        ("target", 7),
        ("sess", 5),
        ("msg/s", 7),
        ("tgt CPU%", 8),
        ("CPU us/msg", 10),
        ("100%@", 6),
        ("x nginx", 7),
        ("x floor", 7),
        ("x direct", 8),
        ("p50 ms", 7),
        ("p99 ms", 7),
        ("RSS MiB", 7),
        ("mem x nginx", 11),
        ("lost", 6),
        ("keeps up", 8),
        ("core1%", 6),
        ("other%", 6),
        ("note", 0),
    ]
    head = "  ".join(name.rjust(w) if w else name for name, w in cols)
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (ORDER.get(r["target"], 9), r["sessions"])):
        tc = target_cpu(r)
        vals = [
            r["target"],
            str(r["sessions"]),
            fmt(r.get("msgs_per_s"), ".0f"),
            fmt(tc.get("cpu_pct"), ".1f"),
            fmt(tc.get("us_per_msg")),
            est_max(r),
            ratio(r, "nginx"),
            ratio(r, "floor"),
            ratio(r, "direct"),
            fmt(r.get("rtt_p50_ms")),
            fmt(r.get("rtt_p99_ms")),
            fmt(rss(r), ".1f"),
            mem_ratio(r, "nginx"),
            str(r.get("lost", "-")),
            verdict(r),
            fmt(core_busy(r, "cpu1"), ".0f"),
            fmt(foreign_pct(r), ".0f"),
            r.get("why_not", ""),
        ]
        print("  ".join(v.rjust(w) if w else v for v, (_, w) in zip(vals, cols, strict=True)))
    print()
    print("msg/s: messages per second each way (client->bot), measured over the window.")
    print("100%@: sessions at which the target would use one full core (linear estimate).")
    print("CPU us/msg: target process CPU (utime+stime) / messages relayed, both directions")
    print("counted (client->bot + bot->client); for 'direct' it is the echo bot itself.")
    print("RSS MiB: the target's resident memory at the end of the window (nginx: master")
    print("and worker); mem x nginx: that, over nginx's at the same session count.")
    print("x nginx, x floor, x direct: CPU us/msg over that target's at the same session count;")
    print("floor = bench/trio_floor.py, a minimal Trio relay of this design: its least cost.")
    print("keeps up: nothing lost/reordered/corrupt, every session opened, RTT p50 < 5 ms,")
    print("generator on schedule. 'no*' = core 1 (loadgen [+ echo bot]) was")
    print(f">= {HARNESS_BUSY:.0f}% busy while the target was not: the limit is the harness.")
    print("core1%: core 1 busy (all processes). other%: CPU on core 0 or 1 used by processes")
    print("that are not part of the benchmark; 'no~' = failed while other% > 10: re-run it.")
    print()
    targets = sorted({r["target"] for r in rows}, key=lambda t: ORDER.get(t, 9))
    for t in targets:
        pts = sorted((r for r in rows if r["target"] == t), key=lambda r: r["sessions"])
        ok = [r["sessions"] for r in pts if r["keeps_up"]]
        best = max(ok) if ok else None
        above = [r for r in pts if not r["keeps_up"] and (best is None or r["sessions"] > best)]
        if best is None:
            msg = "kept up with none of " + ",".join(str(r["sessions"]) for r in pts)
        elif above:
            first_fail = above[0]
            if foreign_pct(first_fail) > FOREIGN_MAX:
                how = f"disturbed by other processes ({foreign_pct(first_fail):.0f}% of a core)"
            elif limited_by_harness(first_fail):
                how = "harness-bound"
            else:
                how = "target-bound"
            msg = f"{best} sessions (failed at {first_fail['sessions']}: {how}; "
            msg += f"{first_fail.get('why_not', '')})"
        else:
            msg = f">= {best} sessions (highest point tried)"
        ref = next((r for r in reversed(pts) if r["keeps_up"]), None)
        if ref is not None and est_max(ref) != "-":
            msg += f"; one full core at ~{est_max(ref)} (linear estimate)"
        print(f"max sessions kept up  {t:7s} {msg}")
    print_over_floor(rows, idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
