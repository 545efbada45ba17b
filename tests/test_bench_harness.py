"""`scripts/bench`'s own pieces, small and real: they must keep measuring what they say.

A real `relay serve` in front of a bot that the harness serves itself (`--bot-port`: the
load generator, or idle.py, is also the echo bot, in its own loop). The C load generator
is compiled with every warning an error and run next to the Python one (its reference):
both keep up, lose nothing and print the same keys. idle.py opens sessions and reports
memory, set-ups and its own CPU. The runs are a few seconds of a few sessions: this checks
the harness, not the gateway's speed (that is `scripts/bench`).

The bot's port is picked before relay starts (relay's config names it); a bind clash
there is retried with another port, up to 3 times.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from ports import free_port
from processes import Served, relay_serve

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RUN_BOUND = 60.0  # seconds for one harness run on a loaded 2-core machine


@pytest.fixture(scope="module")
def loadgen_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: scripts/test installs gcc (apt-get install gcc)")
    out = tmp_path_factory.mktemp("loadgen") / "loadgen"
    built = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                            str(BENCH / "loadgen.c")], capture_output=True, text=True,
                           timeout=RUN_BOUND, check=False)
    assert built.returncode == 0, built.stderr
    return out


@asynccontextmanager
async def gateway(tmp_path: Path, bot_port: int) -> AsyncIterator[Served]:
    config = tmp_path / f"relay-{bot_port}.toml"
    config.write_text(f"""
[server]
ws_bind = ["127.0.0.1:0"]
api_bind = ["127.0.0.1:0"]

[agents.bench]
bot = "ws://127.0.0.1:{bot_port}/ws"
max_clients = 100000
""")
    async with relay_serve(config, tmp_path / f"relay-{bot_port}.err") as served:
        yield served


async def harness_run(tmp_path: Path, command: list[str], *, idle: bool = False
                      ) -> dict[str, Any]:
    """Run ``command`` + ``--url URL --bot-port P`` and the gateway's PID (``--pid`` for
    idle.py, ``--cpu-pid target=`` for a load generator) against a fresh gateway; its
    JSON."""
    for _ in range(3):
        bot_port = free_port()
        async with gateway(tmp_path, bot_port) as served:
            url = f"ws://127.0.0.1:{served.ws_port}/ws/generic/bench.local"
            with trio.fail_after(RUN_BOUND):
                done = await trio.run_process(
                    [*command, "--url", url, "--bot-port", str(bot_port),
                     *(["--pid", str(served.process.pid)] if idle else
                       ["--cpu-pid", f"target={served.process.pid}"])],
                    capture_stdout=True, capture_stderr=True, check=False)
        err = done.stderr.decode(errors="replace")
        if "Address already in use" in err or "EADDRINUSE" in err:
            continue  # the picked port was taken meanwhile: pick another
        assert done.stdout, err
        result: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
        return result
    raise AssertionError("the bot port clashed three times")


LOAD = ["--sessions", "20", "--rate", "50", "--warmup", "0.5", "--duration", "1.5",
        "--drain", "3"]


def assert_kept_up(result: dict[str, Any], sessions: int) -> None:
    assert result["sessions_open"] == sessions and result["sessions_failed"] == 0, result
    assert result["bot_in_loadgen"] is True
    assert result["lost"] == 0 and result["corrupt"] == 0 and result["reordered"] == 0
    assert result["received"] == result["sent"] > 0
    assert result["rtt_samples"] > 0 and result["rtt_p50_ms"] is not None
    target = result["cpu"]["target"]
    assert target["cpu_s"] >= 0 and target["rss_kib"] > 0


async def test_the_c_load_generator_matches_the_python_one(
        tmp_path: Path, loadgen_c: Path) -> None:
    c = await harness_run(tmp_path, [str(loadgen_c), *LOAD, "--label", "c"])
    py = await harness_run(tmp_path, [sys.executable, str(BENCH / "loadgen.py"), *LOAD,
                                      "--label", "py"])
    for result in (c, py):
        assert_kept_up(result, 20)
    assert c["impl"] == "c" and "impl" not in py
    assert set(c) - {"impl"} == set(py)
    assert set(c["loadgen"]) == set(py["loadgen"])
    assert set(c["cpu"]["target"]) == set(py["cpu"]["target"])


async def test_the_c_load_generator_refuses_bad_arguments_like_the_python_one(
        loadgen_c: Path) -> None:
    for args in (["--url", "ws://127.0.0.1:1/x", "--size", "8"],
                 ["--url", "http://127.0.0.1:1/x"], ["--sessions", "3"]):
        for command in ([str(loadgen_c)], [sys.executable, str(BENCH / "loadgen.py")]):
            done = await trio.run_process([*command, *args], capture_stdout=True,
                                          capture_stderr=True, check=False)
            assert done.returncode == 2, (command, args, done.stderr)
            assert done.stdout == b""


async def test_idle_py_serves_the_bot_and_reports_memory_set_ups_and_its_own_cpu(
        tmp_path: Path) -> None:
    result = await harness_run(tmp_path, [sys.executable, str(BENCH / "idle.py"),
                                          "--sessions", "50", "--label", "relay"],
                         idle=True)
    assert result["sessions"] == 50 and result["failed"] == 0, result
    assert result["setups_per_s"] > 0 and result["cpu_us_per_setup"] is not None
    assert result["kib_per_session"] is not None
    assert 0 <= result["harness_cpu_pct"] <= 200
