"""The driver behind scripts/fuzz (run that: it sets up .venv and tries atheris first).

Targets (tests/fuzz_targets.py): ``scanner``, ``upgrade``, ``start_body``; ``all`` (the
default) runs the three in one coverage-guided run, the first input byte choosing the
target. ``selftest`` fails on purpose (8 bytes or more, the first over 0x80):
it checks that a find is reported as one.

atheris runs libFuzzer in a child process (libFuzzer ends its process when done), with
relay, wsproto and h11 instrumented; its log is kept in fuzz-out/atheris.log. The
hypothesis engine runs batches of generated and mutated inputs until the time is up and
counts the lines of relay/ they executed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
OUT = Path(os.environ.get("RELAY_FUZZ_OUT", ROOT / "fuzz-out")).resolve()
NAMES = ("scanner", "upgrade", "start_body")

_UPGRADE = (b"GET /ws/generic/a.local HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
SEEDS: dict[str, list[bytes]] = {
    "scanner": [
        b"\x01\x05\x09\x0d" + b"\x81\x85abcd" + bytes(x ^ y for x, y in zip(b"hello", b"abcd" * 2,
                                                                         strict=False)),
        b"\x00\x02\x03\x04\x82\x7e\x00\x80" + b"z" * 128 + b"\x88\x02\x03\xe8",
        b"\x01\x01\x02\x03\x01\x81abcd\x00\x80\x89\x80abcd\x80\x81abcdz",
    ],
    "upgrade": [
        b"\x00" + _UPGRADE,
        b"\x10" + _UPGRADE + b"\x81\x82abcd\x09\x07",
        b"\x20" + _UPGRADE.replace(b"/ws/generic/a.local", b"/ws/generic?serviceHost=t.local"
                                   b"&token=x"),
        b"\x05" + _UPGRADE.replace(b"\r\n\r\n", b"\r\norigin: https://app.example\r\n\r\n"),
    ],
    "start_body": [b'{"transport": "websocket"}',
                   b'{"transport": "websocket", "body": {"a": [1, 2.5, null, "\\u00e9"]}}',
                   b'{"transport": "websocket", "body": 1e308}'],
}


def _selftest(data: bytes) -> None:
    assert not (len(data) >= 8 and data[0] > 0x80), "planted failure (selftest target)"


def targets() -> dict[str, Callable[[bytes], None]]:
    from fuzz_targets import TARGETS

    return {**TARGETS, "selftest": _selftest}


def make_one_input(name: str, table: dict[str, Callable[[bytes], None]]
                   ) -> Callable[[bytes], None]:
    if name != "all":
        return table[name]

    def combined(data: bytes) -> None:
        if data:
            table[NAMES[data[0] % len(NAMES)]](data[1:])

    return combined


def seeds_for(name: str) -> list[bytes]:
    if name == "all":
        return [bytes([i]) + s for i, n in enumerate(NAMES) for s in SEEDS[n]]
    return SEEDS.get(name, [b"\x00\x00"])


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save(data: bytes, name: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"crash-{name}-{hashlib.sha1(data).hexdigest()[:12]}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------ atheris


def atheris_child(args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=["relay", "wsproto", "h11"]):
        table = targets()
    one = make_one_input(args.target, table)
    atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", "-timeout=60",
                   f"-artifact_prefix={args.artifacts}/", "-print_final_stats=1",
                   "-max_len=4096", args.corpus], one)
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace) -> int:
    OUT.mkdir(exist_ok=True)
    log_path = OUT / "atheris.log"
    with tempfile.TemporaryDirectory(prefix="relay-fuzz-") as tmp:
        corpus, artifacts = Path(tmp, "corpus"), Path(tmp, "artifacts")
        corpus.mkdir()
        artifacts.mkdir()
        for i, seed in enumerate(seeds_for(args.target)):
            (corpus / f"seed-{i}").write_bytes(seed)
        cmd = [sys.executable, __file__, "--atheris-child", "--target", args.target,
               "--seconds", str(args.seconds), "--corpus", str(corpus),
               "--artifacts", str(artifacts)]
        with open(log_path, "wb") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.seconds + 300).returncode
        text = log_path.read_text(errors="replace")
        stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", text))
        progress = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", text)
        execs = stats.get("number_of_executed_units", progress[-1][0] if progress else "?")
        cov, ft = progress[-1][1:] if progress else ("?", "?")
        found = sorted(artifacts.iterdir())
        summary = (f"fuzz: engine=atheris target={args.target} seconds={args.seconds} "
                   f"executions={execs} coverage={cov} edges, {ft} features "
                   f"(relay, wsproto, h11 instrumented)")
        if code == 0 and not found:
            print(summary + " found=0")
            return 0
        for path in found:
            data = path.read_bytes()
            kept = save(data, args.target)
            match = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n(?:==|INFO|MS:)",
                              text, re.S)
            if match:
                print(match.group(1))
            print(f"reproducer ({len(data)} bytes, {path.name}): {data[:300]!r}")
            print(f"saved as {_show(kept)}; replay: scripts/fuzz --replay "
                  f"{_show(kept)} --target {args.target}")
        if not found:
            print(text[-3000:])
            print(f"fuzz: the atheris run ended with status {code} and no reproducer; "
                  f"see {_show(log_path)}")
        print(summary + f" found={max(len(found), 1)}")
        return 1


# ------------------------------------------------------------------------------ hypothesis


class _Coverage:
    """The lines of relay/ executed (a trace function on relay's frames only)."""

    def __init__(self) -> None:
        self.lines: set[tuple[str, int]] = set()
        self.prefix = str(ROOT / "relay") + os.sep

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(self.prefix):
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
            return self._local
        return None

    def start(self) -> None:
        sys.settrace(self._global)

    def stop(self) -> None:
        sys.settrace(None)


def run_hypothesis(args: argparse.Namespace) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    one = make_one_input(args.target, targets())
    seeds = seeds_for(args.target)

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            op = draw(st.integers(0, 2))
            at = draw(st.integers(0, len(data)))
            if op == 0:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif op == 1:
                del data[at:at + draw(st.integers(1, 8))]
            elif at < len(data):
                data[at] = draw(st.integers(0, 255))
        return bytes(data)

    inputs = st.one_of(mutated(), mutated(), st.binary(max_size=512))
    executions = 0
    failing: list[bytes] = []

    def run_one(data: bytes) -> None:
        nonlocal executions
        executions += 1
        try:
            one(data)
        except BaseException:
            failing.append(data)
            raise

    coverage = _Coverage()
    deadline = time.monotonic() + args.seconds
    batches = 0
    coverage.start()
    try:
        while time.monotonic() < deadline:
            batches += 1
            test = settings(max_examples=200, deadline=None, database=None,
                            phases=[Phase.generate, Phase.shrink],
                            suppress_health_check=list(HealthCheck))(given(inputs)(run_one))
            test()
    except BaseException:
        coverage.stop()
        traceback.print_exc(file=sys.stdout)
        data = failing[-1] if failing else b""
        kept = save(data, args.target)
        print(f"reproducer ({len(data)} bytes): {data[:300]!r}")
        print(f"saved as {_show(kept)}; replay: scripts/fuzz --replay "
              f"{_show(kept)} --target {args.target}")
        print(f"fuzz: engine=hypothesis target={args.target} seconds={args.seconds} "
              f"executions={executions} coverage={len(coverage.lines)} lines of relay/ "
              "found=1")
        return 1
    coverage.stop()
    print(f"fuzz: engine=hypothesis target={args.target} seconds={args.seconds} "
          f"executions={executions} coverage={len(coverage.lines)} lines of relay/ found=0")
    return 0


def replay(args: argparse.Namespace) -> int:
    data = Path(args.replay).read_bytes()
    try:
        make_one_input(args.target, targets())(data)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print(f"fuzz: replay of {args.replay} ({len(data)} bytes) failed")
        return 1
    print(f"fuzz: replay of {args.replay} ({len(data)} bytes) passed")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    ap.add_argument("--target", default="all", choices=["all", *NAMES, "selftest"])
    ap.add_argument("--engine", default="auto", choices=["auto", "atheris", "hypothesis"])
    ap.add_argument("--replay", metavar="FILE", help="run one saved input and report")
    ap.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.atheris_child:
        atheris_child(args)
        return 0
    if args.replay:
        return replay(args)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
            return 2
        return run_atheris(args)
    return run_hypothesis(args)


if __name__ == "__main__":
    sys.exit(main())
