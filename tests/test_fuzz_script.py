"""scripts/fuzz: bounded, exit 0 with nothing found, 1 with the reproducer saved and a
replay command, and a last line giving executions and coverage. Runs the hypothesis
engine (atheris is optional: scripts/fuzz installs it when it can)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fuzz.py"


def fuzz(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--engine", "hypothesis", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=ROOT,
        env={"RELAY_FUZZ_OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout.strip().splitlines()


def test_a_clean_run_exits_0_and_reports_executions_and_coverage(tmp_path: Path) -> None:
    code, lines = fuzz(tmp_path, "--seconds", "1", "--target", "start_body")
    assert code == 0, lines[-20:]
    last = re.fullmatch(r"fuzz: engine=hypothesis target=start_body seconds=1 "
                        r"executions=(\d+) coverage=(\d+) lines of relay/ found=0", lines[-1])
    assert last, lines[-1]
    assert int(last.group(1)) > 50 and int(last.group(2)) > 20
    assert not list(tmp_path.iterdir())


def test_a_find_exits_1_with_the_reproducer_and_replays(tmp_path: Path) -> None:
    code, lines = fuzz(tmp_path, "--seconds", "30", "--target", "selftest")
    assert code == 1
    assert lines[-1].endswith("found=1"), lines[-1]
    assert any("planted failure" in line for line in lines)
    (saved,) = tmp_path.iterdir()
    data = saved.read_bytes()
    assert len(data) >= 8 and data[0] > 0x80  # the planted condition, shrunk
    assert any(f"replay: scripts/fuzz --replay {saved}" in line for line in lines)
    code, lines = fuzz(tmp_path, "--replay", str(saved), "--target", "selftest")
    assert code == 1 and lines[-1].endswith("failed")
    ok = tmp_path / "ok"
    ok.write_bytes(b"\x00")
    code, lines = fuzz(tmp_path, "--replay", str(ok), "--target", "selftest")
    assert code == 0 and lines[-1].endswith("passed")


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert fuzz(tmp_path, "--seconds", "0")[0] == 2
    assert fuzz(tmp_path, "--target", "nope")[0] == 2
