"""The upgrade path under hypothesis: a real ClientConnection (h11 parsing, the handshake
decision, token check, admission, the in-process echo bot) on an in-memory stream and
trio's fake clock, fed well-formed, mutated and random request bytes split at any point.

Whatever a client sends, it gets a 101 or an HTTP error with the JSON envelope, the
connection ends, and nothing is left counted (sessions, handshake slots, connections).
A well-formed request, however split, is a 101; each mutation gets its own status.
The same target runs unbounded in `scripts/fuzz` (tests/fuzz_targets.py).
"""

from __future__ import annotations

import trio
import trio.testing
from fuzz_targets import _answer, _upgrade, upgrade_target
from hypothesis import given, settings
from hypothesis import strategies as st

BASE = [
    ("host", "relay.example"),
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
]
TARGETS = ["/ws/generic/a.local", "/ws/generic?serviceHost=a.local",
           "/ws/generic/a.local/anything", "/ws/generic/a.local?x=1&y=%20"]


def request(method: str = "GET", target: str = "/ws/generic/a.local",
            headers: list[tuple[str, str]] | None = None, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{k}: {v}" for k, v in (BASE if headers is None else headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(data: bytes, cut: int = 0, eof: bool = True) -> int:
    raw, _ = trio.run(_upgrade, data, cut, eof,
                      clock=trio.testing.MockClock(autojump_threshold=0))
    return _answer(raw)[0]


@settings(max_examples=60, deadline=None)
@given(target=st.sampled_from(TARGETS), cut=st.integers(0, 255),
       order=st.permutations(BASE))
def test_a_well_formed_upgrade_is_101_however_split(target: str, cut: int,
                                                      order: list[tuple[str, str]]) -> None:
    data = request(target=target, headers=order)
    upgrade_target(bytes([cut]) + data)
    assert status_of(data, cut) == 101


def test_each_mutation_gets_its_own_refusal() -> None:
    """The property below is not vacuous: these mutations are each refused as such."""
    no_key = [h for h in BASE if h[0] != "sec-websocket-key"]
    assert status_of(request(method="POST")) == 405
    assert status_of(request(target="/ws/generic/zz.local")) == 404
    assert status_of(request(target="/ws/generic/a.other")) == 404
    assert status_of(request(target="/ws/generic/t.local")) == 403  # token agent, no token
    assert status_of(request(headers=no_key)) == 400
    assert status_of(request(headers=[*BASE[:3], ("sec-websocket-version", "8"), BASE[4]])
                     ) == 426
    assert status_of(request(headers=[*BASE, ("origin", "https://evil.example")])) == 403
    assert status_of(request(headers=[*BASE, ("x", "y" * 20000)])) == 431
    assert status_of(b"GARBAGE\r\n\r\n") == 400
    assert status_of(request()[:-2]) == 400  # the client left mid-request
    assert status_of(request()[:-2], eof=False) == 408  # went silent: handshake_timeout


_mutations = st.one_of(
    st.builds(lambda m: request(method=m), st.sampled_from(["POST", "get", "PUT", "G\x00T"])),
    st.builds(lambda t: request(target=t),
              st.text(alphabet="/%.?&=#ab\\ws~generic:@", max_size=40).map(lambda t: "/" + t)),
    st.builds(lambda hs: request(headers=hs),
              st.lists(st.sampled_from([*BASE, ("connection", "close"), ("upgrade", "h2c"),
                                               ("sec-websocket-key", "short"),
                                               ("authorization", "Bearer x"),
                                               ("origin", "https://app.example"),
                                               ("sec-websocket-protocol", ",,"),
                                               ("content-length", "5"),
                                               ("transfer-encoding", "chunked")]),
                       max_size=9)),
    st.builds(lambda v: request(version=v), st.sampled_from(["1.0", "2", "0.9", "1.1 "])),
    st.builds(lambda r, i, b: r[:i] + b + r[i:], st.sampled_from([request()]),
              st.integers(0, 200), st.binary(max_size=8)),
    st.binary(max_size=300),
)


@settings(max_examples=120, deadline=None)
@given(data=_mutations, cut=st.integers(0, 255), tail=st.binary(max_size=20))
def test_any_request_bytes_get_an_answer_and_leave_nothing_behind(
        data: bytes, cut: int, tail: bytes) -> None:
    upgrade_target(bytes([cut]) + data + tail)


def test_a_protocol_error_ends_an_in_process_session_found_by_this_fuzz() -> None:
    """Found by the property above: after a bad frame (here unmasked, a reserved opcode,
    text that is not UTF-8) an in-process bot's session used to stay open forever, its
    socket and client slot with it, even once the client had gone. Now the client gets
    1002 or 1007 and the session ends (the fake clock would run 600 s first otherwise)."""
    for frame, code in [(b"\x82\x00", 1002), (b"\x83\x80abcd", 1002),
                        (b"\x81\x82abcd\x9e\x9c", 1007)]:
        for eof in (True, False):
            raw, gateway = trio.run(_upgrade, request() + frame, 0, eof,
                                    clock=trio.testing.MockClock(autojump_threshold=0))
            close = raw.partition(b"\r\n\r\n")[2]
            assert close[0] == 0x88 and int.from_bytes(close[2:4], "big") == code, close
            assert not gateway.rt.registry.members()
            text = gateway.metrics.render()[0].decode()
            assert 'reason="client_protocol_error"} 1.0' in text
