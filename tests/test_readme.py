"""The README runs as written: every ```sh and ```python block, in order, on a fresh copy.

The copy holds the repository's tracked files only (what a clone has: no .venv), in a
temporary directory; its first block's `scripts/serve` installs `.venv` there (pip's cache
is reused), as on a new user's machine. Shell blocks run with `bash -e` (a failing command
fails the block), each in its own process group, which is killed by its id afterwards, so a
background `scripts/serve` never outlives its block. Python blocks run with the copy's
`.venv/bin/python`. Blocks fenced with another info string (```text, ```toml,
```console, ```py-fragment) are not meant to run alone and are skipped.

The README uses the default ports 8700/8701. Only this test binds them: runs of it (other
checkouts on this machine) take turns through a lock file, and the test waits, bounded, for
the ports to be free, and fails saying so if something else holds them.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import relay

ROOT = Path(relay.__file__).resolve().parent.parent
README = ROOT / "README.md"
PORTS = (8700, 8701)
LOCK = Path(tempfile.gettempdir()) / "relay-readme-test.lock"
TURN_BOUND = 900.0  # seconds to wait for another run of this test to finish
PORT_BOUND = 60.0  # seconds for the default ports to become free
FIRST_BLOCK_BOUND = 600.0  # seconds: the first block installs .venv
BLOCK_BOUND = 180.0  # seconds for any other block
RUN_LANGS = ("sh", "python")
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
             ".hypothesis", "build", "bench-out"}

# What a block must print, besides exiting 0 without a traceback; keyed by a line of it.
EXPECT: dict[str, list[str]] = {
    'open_websocket_url("ws://127.0.0.1:8700/ws/generic/echo.local")': [
        "relay ready: WebSocket ws://127.0.0.1:8700", "\nhello\n", '"status":"ok"'],
    "/v1/public/demo/start": [
        "relay ready: WebSocket ws://127.0.0.1:8700", '"token":', "\nhello\n",
        "HTTP/1.1 403", '"code":"replayed"'],
    "async def main():\n    gateway = relay.Gateway(": [
        "ready\n", "connected echo\n", "hi\n", "gone client_closed\n"],
}


@attrs.frozen
class Block:
    lang: str
    code: str
    line: int  # where it starts in README.md


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in re.finditer(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        blocks.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return blocks


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True, timeout=60).stdout
        return [Path(p) for p in out.decode().split("\0") if p and (ROOT / p).exists()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: an export of one
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames
                           if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(dirpath, f).relative_to(ROOT) for f in filenames]
        return files


def fresh_copy(dest: Path) -> None:
    for rel in tracked_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)


def clean_env() -> dict[str, str]:
    """A new user's shell: no virtualenv of ours on PATH, no secret set."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RELAY_SECRET", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and p != venv_bin)
    # a Python 3.11 for `python -m venv`; sys._base_executable is private, not in typeshed
    env["PYTHON"] = sys._base_executable  # type: ignore[attr-defined]
    return env


@pytest.fixture
def turn() -> Iterator[None]:
    """One run of this test at a time on this machine (they all need 8700/8701)."""
    with LOCK.open("a") as lock:
        deadline = time.monotonic() + TURN_BOUND
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run of the README test held {LOCK} for "
                                f"{TURN_BOUND} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_default_ports() -> None:
    deadline = time.monotonic() + PORT_BOUND
    while not all(port_free(p) for p in PORTS):
        if time.monotonic() > deadline:
            busy = [p for p in PORTS if not port_free(p)]
            pytest.fail(f"port(s) {busy} on 127.0.0.1 are held by another process: the "
                        "README's examples bind the default ports 8700/8701, so this test "
                        "needs them free")
        time.sleep(0.2)


def run_block(block: Block, cwd: Path, env: dict[str, str], scratch: Path, bound: float
              ) -> tuple[int, str, str]:
    if block.lang == "sh":
        argv = ["bash", "-e", "-c", block.code]
    else:
        script = scratch / f"readme_line_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        argv = [str(cwd / ".venv" / "bin" / "python"), str(script)]
    out, err = scratch / f"{block.line}.out", scratch / f"{block.line}.err"
    with out.open("wb") as o, err.open("wb") as e:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=o, stderr=e, start_new_session=True)
        try:
            status = process.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            status = -1
        finally:
            try:  # the block's group: its own background jobs (a scripts/serve) included
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    return (status, out.read_text(errors="replace"), err.read_text(errors="replace"))


def test_readme_blocks_are_fenced_by_whether_they_run() -> None:
    """Every fenced block says what it is; the runnable ones include the walk-throughs."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert [b.line for b in blocks if not b.lang] == [], "fences without an info string"
    runnable = [b for b in blocks if b.lang in RUN_LANGS]
    for key in EXPECT:
        assert any(key in b.code for b in runnable), f"no runnable README block has {key!r}"


@pytest.mark.slow
@pytest.mark.usefixtures("turn")
def test_readme_runs_as_written_on_a_fresh_copy(tmp_path: Path) -> None:
    copy, scratch = tmp_path / "relay", tmp_path / "scratch"
    copy.mkdir()
    scratch.mkdir()
    fresh_copy(copy)
    assert not (copy / ".venv").exists()
    env = clean_env()
    blocks = [b for b in readme_blocks((copy / "README.md").read_text(encoding="utf-8"))
              if b.lang in RUN_LANGS]
    assert blocks
    timings = []
    for i, block in enumerate(blocks):
        wait_for_default_ports()
        started = time.monotonic()
        status, out, err = run_block(block, copy, env, scratch,
                                     FIRST_BLOCK_BOUND if i == 0 else BLOCK_BOUND)
        timings.append(f"line {block.line}: {time.monotonic() - started:.1f} s")
        where = f"README.md line {block.line} ({block.lang})\n--- stdout\n{out}\n--- stderr\n{err}"
        assert status == 0, f"exit status {status}: {where}"
        assert "Traceback" not in out + err, where
        for key, wanted in EXPECT.items():
            if key in block.code:
                for text in wanted:
                    assert text in out, f"{text!r} not printed: {where}"
    print("README blocks:", "; ".join(timings))
    # scripts/serve installed what serving needs, not the dev tools.
    probe = subprocess.run(
        [str(copy / ".venv" / "bin" / "python"), "-c",
         "import importlib.util as u; print([m for m in ('pytest', 'hypothesis', 'mypy', "
         "'ruff', 'trustme') if u.find_spec(m)], bool(u.find_spec('relay')))"],
        capture_output=True, text=True, timeout=60, check=True, cwd=scratch, env=env)
    assert probe.stdout.strip() == "[] True", probe.stdout


# -- the docs stand alone and link each other ---------------------------------------------

DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in
            re.finditer(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading for #{anchor} in {file}"


def test_readme_links_every_doc() -> None:
    links = {t.partition("#")[0] for t in LINK.findall(README.read_text(encoding="utf-8"))}
    for doc in DOCS:
        assert f"docs/{doc.name}" in links, f"README names or needs docs/{doc.name} unlinked"


def test_reference_keeps_the_sections_others_cite() -> None:
    found = anchors(ROOT / "docs" / "reference.md")
    for section in ("Configuration", "Endpoints and status codes", "Close codes", "Tokens"):
        assert slug(section) in found


def test_reference_documents_every_config_key() -> None:
    from relay.config import _AGENT_KEYS, _SERVER_KEYS, _STORE_KEYS

    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for key in {*_SERVER_KEYS, *_STORE_KEYS, *_AGENT_KEYS}:
        assert f"| `{key}` |" in text, f"docs/reference.md has no row for {key}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_user_docs_cite_nothing_users_cannot_see(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "SPEC §" not in text and "shared/" not in text and "SPEC.md" not in text


@pytest.mark.parametrize("command", [[], ["serve"], ["check-config"], ["mint-token"]])
def test_cli_help_cites_the_reference_not_the_spec(
        command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "SPEC" not in out and "shared/" not in out
