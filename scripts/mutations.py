"""Named mutations of relay/ and the runner behind `scripts/mutate`.

Each mutation is one deliberate break (file, old text, new text) with a description of
the behaviour it removes and the fast tests that must catch it. The runner copies the
project into a temporary directory once, applies one mutation at a time *there* (the
worktree is never edited), runs the mutation's tests with `-x`, and restores the file.
A mutant is killed when a test fails or the per-mutant bound runs out (a hang is a
regression too); it survives when every test passes. Old text that no longer occurs
exactly once is reported as stale (the code moved: update the mutation).

The score is killed / (killed + survived). Not part of CI: run it before merging a change
to the modules below, and when you add a behaviour, add its mutation and the test that
kills it (docs/testing.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STORE = ("tests/test_store.py", "tests/test_store_conformance.py")
E2E = "tests/test_relay_e2e.py"
TOKENS = "tests/test_token_e2e.py"
LIFE = "tests/test_lifecycle.py"
EMB = "tests/test_embedded.py"
INPROC = "tests/test_inprocess_e2e.py"
LOOPS = "tests/test_gateway_loops.py"
HS_E2E = "tests/test_handshake_e2e.py"
CLOSING = "tests/test_closing.py"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    description: str
    tests: tuple[str, ...]


M = Mutation
MUTATIONS: list[Mutation] = [
    # -- handshake ---------------------------------------------------------------------
    M("handshake.origin-unchecked", "relay/handshake.py",
      "bad = check_origin(upgrade, cors_origins)", "bad = None",
      "a foreign browser Origin is no longer refused", ("tests/test_handshake.py",)),
    M("handshake.subprotocol-dropped", "relay/handshake.py",
      "    if subprotocol:\n        headers.append", "    if False:\n        headers.append",
      "the bot's chosen subprotocol never reaches the client's 101",
      ("tests/test_handshake.py", E2E)),
    M("handshake.no-forwarded-for", "relay/handshake.py",
      '        (b"x-forwarded-for", client_addr.encode()),\n', "",
      "the bot no longer learns the client's address", ("tests/test_handshake.py",)),
    M("handshake.bot-accept-unchecked", "relay/handshake.py",
      "    if accepts != [generate_accept_token(key)]:", "    if False:",
      "a bot's wrong Sec-WebSocket-Accept is taken as a valid 101",
      ("tests/test_handshake.py",)),
    # -- the heads written and read by hand (http1.py) --------------------------------
    M("http1.header-unchecked", "relay/http1.py",
      "        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):",
      "        if False:",
      "a header value with CR LF is written to the bot (header or request smuggling)",
      ("tests/test_http1.py",)),
    M("http1.target-unchecked", "relay/http1.py",
      "    if not _TARGET.fullmatch(raw_target):", "    if False:",
      "a request target with spaces or CR LF is written to the bot", ("tests/test_http1.py",)),
    M("http1.obs-fold-accepted", "relay/http1.py",
      "        if not colon or not _TOKEN.fullmatch(name):", "        if not colon:",
      "a bot's folded or malformed header line is read as a header", ("tests/test_http1.py",)),
    M("upstream.response-head-unbounded", "relay/upstream.py",
      "                if len(got) > MAX_RESPONSE_HEAD:", "                if False:",
      "a bot's endless 101 head is buffered without bound", (E2E,)),
    M("handshake.head-size-unbounded", "relay/connection.py",
      "                    if size > MAX_REQUEST_HEAD:", "                    if False:",
      "an upgrade head over 16 KiB that arrived in one read is accepted", (HS_E2E,)),
    M("handshake.early-bytes-dropped", "relay/connection.py",
      "        request, early = got\n", "        request, early = got[0], b\"\"\n",
      "client bytes sent right after the upgrade request (before the 101) are lost",
      (E2E, INPROC)),
    M("handshake.listener-shutdown-refusal-off", "relay/connection.py",
      "refusal = refuse_early(shutting_down=rt.shutting_down,",
      "refusal = refuse_early(shutting_down=False,",
      "relay's own listener serves a connection that starts while shutting down", (LOOPS,)),
    M("handshake.embedded-shutdown-refusal-off", "relay/embedded.py",
      "cors_origins=server.cors_origins, shutting_down=rt.shutting_down,",
      "cors_origins=server.cors_origins, shutting_down=False,",
      "Gateway.handle serves an upgrade while shutting down", (EMB,)),
    # -- frames ------------------------------------------------------------------------
    M("frames.mask-unchecked", "relay/frames.py",
      "        if (b1 & _MASK) != self._mask_bit:", "        if False:",
      "unmasked client frames / masked bot frames are relayed", ("tests/test_frames.py",)),
    M("frames.size-off-by-one", "relay/frames.py",
      "        if total > self._max:", "        if total > self._max + 1:",
      "a message one byte over max_message_size passes", ("tests/test_frames.py",)),
    M("frames.fragmented-control-allowed", "relay/frames.py",
      "            if not fin:\n                return Violation(CLOSE_PROTOCOL_ERROR, "
      "\"fragmented control frame\")",
      "            if False:\n                return Violation(CLOSE_PROTOCOL_ERROR, "
      "\"fragmented control frame\")",
      "a fragmented control frame is relayed", ("tests/test_frames.py",)),
    M("frames.orphan-continuation-allowed", "relay/frames.py",
      "            if not self._in_message:\n", "            if False:\n",
      "a continuation frame with no message in progress is relayed",
      ("tests/test_frames.py",)),
    M("frames.close-code-unchecked", "relay/frames.py",
      "            if not valid_close_code(code):", "            if False:",
      "a close frame with an invalid code is relayed", ("tests/test_frames.py",)),
    M("frames.close-reason-utf8-unchecked", "relay/frames.py",
      '                payload[2:].decode("utf-8")',
      '                payload[2:].decode("latin-1")',
      "a close reason that is not UTF-8 is relayed", ("tests/test_frames.py",)),
    M("frames.messages-uncounted", "relay/frames.py",
      "            self._msg_size = 0\n            self.messages += 1",
      "            self._msg_size = 0\n            self.messages += 0",
      "relayed messages are not counted", ("tests/test_frames.py",)),
    # -- closing -----------------------------------------------------------------------
    M("closing.replaced-not-first", "relay/closing.py",
      '    if cancel_reason == "replaced":\n        return REPLACED_BY_NEWER',
      '    if cancel_reason == "replaced!":\n        return REPLACED_BY_NEWER',
      "a replaced session is not closed with 4001", (CLOSING, LIFE)),
    M("closing.timeout-beats-peer-close", "relay/closing.py",
      "    if timed_out and relay_outcome is None:", "    if timed_out:",
      "a session timeout overrides the peer's own close that came first", (CLOSING, LIFE)),
    M("closing.reason-not-truncated", "relay/closing.py",
      "    data = text.encode()[:123]", "    data = text.encode()[:200]",
      "a close reason longer than a control frame allows is sent", (CLOSING, E2E)),
    M("closing.client-stall-1001", "relay/closing.py",
      'Outcome("client_stalled", STALLED, GOING_AWAY)',
      'Outcome("client_stalled", GOING_AWAY, GOING_AWAY)',
      "a client that stops reading gets 1001 instead of 1008", (CLOSING, E2E)),
    M("closing.bot-gone-1011", "relay/closing.py",
      'BAD_GATEWAY: CloseCode = (1014, "bad gateway")',
      'BAD_GATEWAY: CloseCode = (1011, "bad gateway")',
      "a vanished bot is reported as 1011 instead of 1014", (CLOSING, E2E)),
    M("closing.silent-partner-unanswered", "relay/passthrough.py",
      "        if code is None and side.close_from is not None:", "        if False:",
      "a peer whose partner never answers its close gets no answer from the gateway", (E2E,)),
    M("closing.partner-answer-not-relayed", "relay/passthrough.py",
      "            if dst.close_from is not None or self._pumps_done == 2:",
      "            if True:",
      "the partner's own answering close is not relayed (the gateway's echo instead)", (E2E,)),
    M("closing.1013-no-wait-for-reply", "relay/connection.py",
      "            # Wait for the client's answering close, then close TCP first",
      "            return\n"
      "            # Wait for the client's answering close, then close TCP first",
      "after a 1013 the gateway closes TCP without waiting for the client's close reply",
      (E2E, TOKENS)),
    M("closing.no-wait-for-answering-close", "relay/passthrough.py",
      "        if side.out.closed and side.close_from is None:\n"
      "            await self._await_close(side)",
      "        if False:\n            await self._await_close(side)",
      "the gateway drops TCP right after its close instead of awaiting the answer", (E2E,)),
    # -- passthrough -------------------------------------------------------------------
    M("passthrough.keepalive-off", "relay/passthrough.py",
      "                    self._schedule_ping(self.client)\n"
      "                    self._schedule_ping(self.bot)",
      "                    pass",
      "relay's own listener no longer pings peers; vanished peers hold sessions", (E2E,)),
    M("passthrough.keepalive-pong-passed-on", "relay/pump.py",
      "            self.answered.set()\n            return True",
      "            self.answered.set()\n            return False",
      "the gateway's own keepalive pongs are passed on to the other peer", (E2E,)),
    M("passthrough.stall-unbounded", "relay/passthrough.py",
      "self.out = Outbound(conn, mask=not is_client, stall_timeout=stall)",
      "self.out = Outbound(conn, mask=not is_client, stall_timeout=math.inf)",
      "a peer that accepts nothing holds its session forever", (E2E,)),
    M("passthrough.size-unlimited", "relay/passthrough.py",
      "max_message_size=limits.max_message_size)", "max_message_size=1 << 62)",
      "max_message_size is not enforced on relay's own listener", (E2E,)),
    M("passthrough.session-timeout-off", "relay/connection.py",
      "                    timeout if timeout is not None else math.inf",
      "                    math.inf",
      "session_timeout is not enforced on relay's own listener", (E2E,)),
    # -- tokens ------------------------------------------------------------------------
    M("tokens.replay-check-off", "relay/auth.py",
      "    if not reserved.ok:\n        return _refusal(rt, reserved)",
      "    if False:\n        return _refusal(rt, reserved)",
      "a replayed token passes the reservation (and may close the incumbent)", (TOKENS,)),
    M("tokens.consume-result-ignored", "relay/auth.py",
      "    if not result.ok:\n        return _refusal(rt, result)",
      "    if False:\n        return _refusal(rt, result)",
      "a token the store refuses still opens a session", (TOKENS,)),
    M("tokens.expiry-inclusive", "relay/tokens.py",
      "    if now >= expires_at:", "    if now > expires_at:",
      "a token is accepted at the very instant it expires", ("tests/test_tokens.py",)),
    M("tokens.org-unchecked", "relay/tokens.py",
      "        and hmac.compare_digest(token_org.encode(), org.encode())", "        and True",
      "a token of another organization is accepted", ("tests/test_tokens.py",)),
    M("tokens.signature-unchecked", "relay/tokens.py",
      "    if not hmac.compare_digest(_sign(secret, payload), signature):", "    if False:",
      "a token with a bad signature is accepted", ("tests/test_tokens.py",)),
    M("tokens.bearer-ignored", "relay/tokens.py",
      '        if scheme.lower() == b"bearer":', '        if scheme.lower() == b"bearer!":',
      "an Authorization: Bearer token is not the first source", ("tests/test_tokens.py",)),
    M("tokens.consumed-marker-not-kept", "relay/store/memory.py",
      "        elif marker.consumed:\n            return ConsumeResult(\"replayed\")",
      "        elif False:\n            return ConsumeResult(\"replayed\")",
      "a used token can be used again", STORE),
    M("store.purge-keeps-markers", "relay/store/memory.py",
      "        for session_id in used:\n            del self._markers[session_id]",
      "        for session_id in used:\n            pass",
      "purge never forgets used tokens: memory grows for ever", STORE),
    M("store.redis-forgets-the-epoch-check", "relay/store/redis.py",
      "  if not s and tonumber(exp) - LIFETIME < since - SLACK then return 'unverifiable' end\n",
      "",
      "a Redis that restarted empty honours a token used before the restart",
      ("tests/test_store_redis.py",)),
    M("store.redis-epoch-not-kept", "relay/store/redis.py",
      "  if e then return tonumber(e) end",
      "  if e then return now end",
      "the epoch moves with every call: tokens a few seconds old are refused",
      ("tests/test_store_redis.py",)),
    # -- the fleet's /start rate limit (Redis) ----------------------------------------------
    M("fleet.rate-per-process", "relay/gateway.py",
      "            fleet_rate=self._store.fleet_rate))",
      "            fleet_rate=None))",
      "on Redis each instance limits /start on its own: a key gets N times its rate",
      ("tests/test_fleet_rate.py",)),
    M("fleet.rate-skew-refills", "relay/fleet_rate.py",
      "  if now > stamp then", "  if true then",
      "an instance whose clock is behind refills the bucket backwards: skew grants more",
      ("tests/test_fleet_rate.py",)),
    M("fleet.rate-bucket-never-expires", "relay/fleet_rate.py",
      "redis.call('PEXPIRE', KEYS[1], ARGV[4])", "redis.call('PERSIST', KEYS[1])",
      "a bucket key stays in Redis for ever (SPEC 9: every key has an expiry)",
      ("tests/test_fleet_rate.py",)),
    # -- control plane: hypercorn's own answers ------------------------------------------
    M("control.hypercorn-answers-bare", "relay/control_errors.py",
      "    return isinstance(getattr(protocol, \"config\", None), RelayHypercornConfig)",
      "    return False",
      "a request hypercorn cannot parse gets an answer without the JSON envelope",
      ("tests/test_control_errors.py",)),
    M("control.every-hypercorn-wrapped", "relay/control_errors.py",
      "    return isinstance(getattr(protocol, \"config\", None), RelayHypercornConfig)",
      "    return True",
      "an embedding app's own hypercorn answers get relay's envelope too",
      ("tests/test_control_errors.py",)),
    # -- registry ----------------------------------------------------------------------
    M("registry.no-wait-for-predecessor", "relay/registry.py",
      "            with trio.move_on_after(agent.limits.close_timeout + REPLACE_MARGIN):\n"
      "                await oldest.done.wait()\n",
      "",
      "the newcomer's bot is dialled before the predecessor's teardown has finished",
      (E2E, EMB)),
    M("registry.reject-mode-replaces", "relay/registry.py",
      '            if agent.when_full == "reject":', '            if False:',
      'when_full = "reject" replaces instead of refusing with 1013', (E2E,)),
    M("registry.replaces-newest", "relay/registry.py",
      "            oldest = self._live[agent.name][0]",
      "            oldest = self._live[agent.name][-1]",
      "the newest client is replaced instead of the oldest", (LIFE,)),
    M("registry.limit-overshoots", "relay/registry.py",
      "        while self.count(agent.name) >= agent.max_clients:",
      "        while self.count(agent.name) > agent.max_clients:",
      "an agent admits one client more than max_clients", (E2E,)),
    # -- in-process bots on relay's own listener ---------------------------------------
    M("inprocess.size-unlimited", "relay/inprocess.py",
      "                    if size > limit:", "                    if False:",
      "max_message_size is not enforced for in-process bots", (INPROC,)),
    M("inprocess.keepalive-ignored", "relay/inprocess.py",
      "            if scope.cancelled_caught:\n                self._client_left = True",
      "            if False:\n                self._client_left = True",
      "an in-process bot's client that stops answering pings holds the session", (INPROC,)),
    M("inprocess.stall-unbounded", "relay/inprocess.py",
      "                await self.conn.send_all(data, self.limits.stall_timeout)\n"
      "                if isinstance(event, TextMessage | BytesMessage):",
      "                await self.conn.send_all(data, math.inf)\n"
      "                if isinstance(event, TextMessage | BytesMessage):",
      "a client that reads nothing from an in-process bot holds the session", (INPROC,)),
    # -- the embedding path (Gateway.handle) -------------------------------------------
    M("embedded.keepalive-off", "relay/embedded_legs.py",
      "                nursery.start_soon(keepalive, self.client, self.limits,\n"
      "                                   lambda: self.end(closing.CLIENT_GONE))\n"
      "                nursery.start_soon(keepalive, self.bot, self.limits,\n"
      "                                   lambda: self.end(closing.BOT_GONE))",
      "                pass",
      "Gateway.handle never pings; vanished peers hold sessions", (EMB,)),
    M("embedded.stall-unbounded", "relay/embedded_legs.py",
      "                with trio.fail_after(self.limits.stall_timeout):\n"
      "                    await dst.send_message(message)",
      "                with trio.fail_after(math.inf):\n"
      "                    await dst.send_message(message)",
      "Gateway.handle: a peer that accepts nothing holds its session", (EMB,)),
    M("embedded.bot-size-unlimited", "relay/embedded_dial.py",
      "                                  agent.limits.max_message_size)",
      "                                  1 << 40)",
      "Gateway.handle: the bot leg's max_message_size is not enforced", (EMB,)),
    M("embedded.inprocess-size-unlimited", "relay/embedded_legs.py",
      "            if too_big(message, limit):\n"
      "                self.end(closing.client_violation(1009, f\"message exceeds {limit} bytes\"))"
      "\n                return\n            counts = ",
      "            if False:\n"
      "                self.end(closing.client_violation(1009, f\"message exceeds {limit} bytes\"))"
      "\n                return\n            counts = ",
      "Gateway.handle: max_message_size is not enforced for in-process bots", (EMB,)),
    # -- the gateway's own loops ---------------------------------------------------------
    M("gateway.counts-never-flushed", "relay/connection.py",
      "        if counts != last:", "        if False:",
      "relayed message and byte counts never reach /metrics (own listener)", (LOOPS,)),
    M("gateway.metrics-loop-off", "relay/gateway.py",
      "            await trio.sleep(METRICS_INTERVAL)\n            self._flush_counts()",
      "            await trio.sleep(METRICS_INTERVAL)",
      "/metrics shows nothing of a session until it ends", (LOOPS,)),
    M("gateway.purge-loop-off", "relay/gateway.py",
      "            await self.rt.store.purge(self.rt.wall_clock())\n", "",
      "expired tokens and bodies are never swept", (LOOPS,)),
]


def _copy_project(dest: Path) -> None:
    for name in ("relay", "tests", "scripts"):
        shutil.copytree(ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)


def _pytest(workdir: Path, tests: tuple[str, ...], timeout: float) -> str:
    """'pass', 'fail' or 'timeout' for these tests in workdir."""
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=--strict-markers", *tests]
    try:
        done = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child by its PID
        return "timeout"
    return "pass" if done.returncode == 0 else "fail"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", default=[],
                        help="run mutations whose id contains this text (repeatable)")
    parser.add_argument("--budget", type=float, default=1800.0,
                        help="seconds after which no new mutant is started (default 1800)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one mutant's tests may take; more counts as killed")
    parser.add_argument("--test", action="append", default=[], dest="tests",
                        help="run this pytest node id instead of the mutation's own tests "
                             "(repeatable): shows which test kills a mutant")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the tests pass without any mutation")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or any(o in m.id for o in args.only)]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.id:44} {m.file:22} {m.description}")
        return 0
    if not chosen:
        print("no mutation matches", file=sys.stderr)
        return 2

    started = time.monotonic()
    killed: list[str] = []
    survived: list[Mutation] = []
    stale: list[Mutation] = []
    skipped: list[Mutation] = []
    with tempfile.TemporaryDirectory(prefix="relay-mutate-") as tmp:
        work = Path(tmp)
        _copy_project(work)
        if not args.no_baseline:
            tests = tuple(sorted({t for m in chosen for t in m.tests}))
            print(f"baseline: {len(tests)} test files without mutation ...", flush=True)
            if _pytest(work, tests, args.timeout * 2) != "pass":
                print("baseline FAILED: fix the suite before mutating", file=sys.stderr)
                return 2
        for i, m in enumerate(chosen, 1):
            if time.monotonic() - started > args.budget:
                skipped.extend(chosen[i - 1:])
                break
            path = work / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                stale.append(m)
                print(f"[{i}/{len(chosen)}] STALE     {m.id}: old text found "
                      f"{original.count(m.old)} times in {m.file}", flush=True)
                continue
            t0 = time.monotonic()
            try:
                path.write_text(original.replace(m.old, m.new))
                result = _pytest(work, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if result == "pass" else (
                "killed" if result == "fail" else "killed (timeout)")
            (survived.append(m) if result == "pass" else killed.append(m.id))
            print(f"[{i}/{len(chosen)}] {verdict:9} {m.id} ({time.monotonic() - t0:.0f} s)",
                  flush=True)

    total = len(killed) + len(survived)
    print()
    if survived:
        print("Surviving mutants (behaviour no test guards):")
        for m in survived:
            print(f"  {m.id}: {m.description}\n    {m.file}: {m.old.strip()[:70]!r}")
    for m in stale:
        print(f"  stale: {m.id} ({m.file} changed; update the mutation)")
    if skipped:
        print(f"  not run (budget of {args.budget:.0f} s spent): {len(skipped)}")
    score = 100.0 * len(killed) / total if total else 0.0
    print(f"\nscore: {len(killed)}/{total} killed ({score:.0f}%), {len(survived)} survived, "
          f"{len(stale)} stale, {len(skipped)} not run, {time.monotonic() - started:.0f} s")
    return 1 if survived or stale else 0


if __name__ == "__main__":
    sys.exit(main())
