"""Two `relay serve` instances behind a real nginx, configured from docs/deploying.md.

The nginx snippet the deployment guide shows is read from the guide itself, its example
addresses replaced by the instances' ports (read from their ready lines) and a free
loopback port for nginx; clients talk only to nginx, and the fleet behaves as one
gateway: /start and the upgrade through it, the body delivered once, a replay refused,
sessions spread over both instances. nginx runs in the foreground as one process
(``master_process off``) and is stopped by its PID.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fleet import WAIT, Instance, fleet, upgrade_status
from fleet import write_config as write_file
from ports import free_port
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import bot_server, http, open_client

GUIDE = Path(__file__).parent.parent / "docs" / "deploying.md"
START_BOUND = 30.0  # seconds for nginx to listen on a loaded machine
POLL = 0.05
PID_AGENT = '[agents.pid]\nbot = "python:pid_bot:pid_bot"\nmax_clients = 100\n'


def guide_snippet() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    blocks: list[str] = re.findall(r"```nginx\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/deploying.md shows exactly one nginx snippet"
    return blocks[0]


def nginx_conf(snippet: str, directory: Path, listen: int,
               instances: list[Instance]) -> str:
    """The guide's snippet with this test's addresses, in a whole nginx.conf."""
    for i, inst in enumerate(instances, start=1):
        snippet = snippet.replace(f"server 10.0.0.{i}:8700;", f"server 127.0.0.1:{inst.ws_port};")
        snippet = snippet.replace(f"server 10.0.0.{i}:8701;",
                                  f"server 127.0.0.1:{inst.api_port};")
    assert "10.0.0." not in snippet, "the snippet names more instances than the test runs"
    assert "listen 80;" in snippet
    snippet = snippet.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return (
        "daemon off;\nmaster_process off;\n"
        f"pid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n    access_log off;\n"
        f"    client_body_temp_path {temp['body']};\n    proxy_temp_path {temp['proxy']};\n"
        f"    fastcgi_temp_path {temp['fastcgi']};\n    uwsgi_temp_path {temp['uwsgi']};\n"
        f"    scgi_temp_path {temp['scgi']};\n"
        + snippet + "}\n"
    )


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


async def wait_listening(port: int, process: trio.Process, stderr: Path) -> None:
    with trio.fail_after(START_BOUND):
        while True:
            if process.returncode is not None:
                raise AssertionError("nginx exited before listening:\n" + read_text(stderr))
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(POLL)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def nginx(directory: Path, listen: int, instances: list[Instance]) -> AsyncIterator[int]:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary is None:
        pytest.fail("nginx is not installed: run scripts/test (as root it installs Debian's "
                    "nginx) or apt-get install nginx")
    conf = write_file(directory / "nginx.conf",
                      nginx_conf(guide_snippet(), directory, listen, instances))
    stderr = directory / "nginx.stderr"
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await wait_listening(listen, process, stderr)
        yield listen
    finally:
        if process.returncode is None:
            process.kill()  # by PID: with master_process off it is the only nginx process
        with trio.move_on_after(10):
            await process.wait()
        print(read_text(directory / "error.log")[-2000:])


async def test_two_instances_behind_nginx_from_the_guide_behave_as_one_gateway(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    lb = free_port()
    async with bot_server() as bot, fleet(
            tmp_path / "fleet", ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
            public_url=f"ws://127.0.0.1:{lb}", agents=PID_AGENT) as f, \
            nginx(tmp_path, lb, [f["a"], f["b"]]):
        # /health and /start through nginx
        with trio.fail_after(WAIT):
            status, _, body = await http("127.0.0.1", lb, "GET", "/health")
        assert status == 200 and json.loads(body)["store"] == "up"
        with trio.fail_after(WAIT):
            status, _, body = await http(
                "127.0.0.1", lb, "POST", "/v1/public/tok/start",
                [("content-type", "application/json"), ("authorization", "Bearer pk_fleet")],
                json.dumps({"transport": "websocket", "body": {"via": "nginx"}}).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["wsUrl"].startswith(f"ws://127.0.0.1:{lb}/ws/generic/tok.")
        auth = [(b"authorization", f"Bearer {answer['token']}".encode())]
        with trio.fail_after(WAIT):
            async with open_client(answer["wsUrl"], extra_headers=auth) as ws:
                await ws.send_message("through nginx")
                while await ws.get_message() != "through nginx":
                    pass
                path = answer["wsUrl"].split(str(lb), 1)[1]
                replay, head = await upgrade_status(lb, path, answer["token"])
                assert replay == 403 and b"replayed" in head, head
        bodies = [json.loads(m)["body"] for m in bot.received
                  if isinstance(m, str) and m.startswith('{"type":"relay.session"')]
        assert bodies == [{"via": "nginx"}]
        # auth-none sessions through nginx land on both instances (round robin)
        pids = set()
        for _ in range(6):
            with trio.fail_after(WAIT):
                async with open_client(f"ws://127.0.0.1:{lb}/ws/generic/pid.local") as ws:
                    greeting = await ws.get_message()
                    assert isinstance(greeting, str) and greeting.startswith("pid:")
                    pids.add(int(greeting[4:]))
                    await ws.send_message("echo")
                    assert await ws.get_message() == "echo"
        assert pids == {f["a"].process.pid, f["b"].process.pid}
