"""Registry (one process): who is live per agent, oldest first, and who gets replaced.

Members are real ``CancellableMember`` objects whose teardown is done once cancelled.
"""

from __future__ import annotations

from relay.config import AgentConfig
from relay.registry import CancellableMember, Registry

AGENT = AgentConfig(name="x", bot="ws://127.0.0.1:9/", max_clients=3, when_full="replace")


class Member(CancellableMember):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def cancel(self, reason: str) -> None:
        super().cancel(reason)
        self.done.set()  # no connection to tear down


async def test_the_oldest_still_live_is_replaced_after_others_left() -> None:
    registry = Registry()
    a, b, c, d, e = (Member(n) for n in "abcde")
    for m in (a, b, c):
        assert await registry.admit(m, AGENT)
    registry.release(b, AGENT.name)  # one in the middle leaves
    assert await registry.admit(d, AGENT)  # room: nobody replaced
    assert [m.cancel_reason for m in (a, c, d)] == [None, None, None]
    assert await registry.admit(e, AGENT)  # full: the oldest (a) makes room
    assert a.cancel_reason == "replaced" and c.cancel_reason is None
    assert registry.members() == [c, d, e]  # in order of arrival
    assert registry.count(AGENT.name) == 3


async def test_release_of_a_member_not_live_changes_nothing() -> None:
    registry = Registry()
    a, stranger = Member("a"), Member("s")
    assert await registry.admit(a, AGENT)
    registry.release(stranger, AGENT.name)
    registry.release(a, "another-agent")
    assert registry.members() == [a]
    registry.release(a, AGENT.name)
    registry.release(a, AGENT.name)  # twice: still nothing to remove, no error
    assert registry.members() == [] and registry.count(AGENT.name) == 0


async def test_reject_mode_refuses_the_newcomer_and_keeps_everyone() -> None:
    registry = Registry()
    full = AgentConfig(name="y", bot="ws://127.0.0.1:9/", max_clients=1, when_full="reject")
    a, b = Member("a"), Member("b")
    assert await registry.admit(a, full)
    assert not await registry.admit(b, full)
    assert a.cancel_reason is None and registry.members() == [a]
