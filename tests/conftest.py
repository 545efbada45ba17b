"""Shared pytest configuration; helpers live in support.py."""

from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Iterator
from types import TracebackType

import pytest
from hypothesis import settings

# No per-example deadline: on a loaded 2-core CI machine a slow example is not a failure.
# In CI (CI=true) the examples are derandomized: the run that lands is the run that was
# tried before it, and a failure there reproduces; exploring new inputs is what local
# runs and scripts/fuzz are for.
settings.register_profile("relay", deadline=None)
settings.register_profile("relay-ci", deadline=None, derandomize=True, database=None)
settings.load_profile("relay-ci" if os.environ.get("CI") == "true" else "relay")


# trio's memory channels warn when collected open; they hold no OS resource, and coredis
# leaves some behind after a connect that failed (Redis down at start). Sockets and files
# are what a leak costs a long-running gateway, and what this check is for.
_NOT_OS_RESOURCES = ("Unclosed <MemoryObjectReceiveStream", "Unclosed <MemoryObjectSendStream")


@pytest.fixture(autouse=True)
def _leaks_are_reported_by_their_own_test() -> Iterator[None]:
    """A socket (or file) a test leaves open fails *that* test, at its teardown.

    Without this, an unclosed socket held in a reference cycle (a failed test's traceback
    holds its frames, and so its sockets) is only collected later, and its ResourceWarning
    turns an unrelated later test red. So after each test: drop the locals of a failed
    test's frames (the report is already written), collect, and fail on what leaked.
    Objects alive at that point are then frozen (`gc.freeze`), so the next collection
    walks only what the next test creates: a few ms per test instead of ~150 ms.
    """
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _drop_locals(getattr(sys, "last_value", None))
        gc.collect()
    gc.freeze()
    leaked = sorted({str(w.message) for w in caught if issubclass(w.category, ResourceWarning)
                     and not str(w.message).startswith(_NOT_OS_RESOURCES)})
    if leaked:
        pytest.fail("left open by this test:\n  " + "\n  ".join(leaked), pytrace=False)


def _drop_locals(exc: BaseException | None) -> None:
    """Free what a failed test's frames hold: every frame of the exception, of the ones
    inside it (a trio test fails with an ExceptionGroup) and of its causes. Like
    `traceback.clear_frames`, plus Python 3.11's cached `f_locals` dict, which
    `frame.clear()` keeps until it is read again."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        stack.extend([e.__cause__, e.__context__])
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # still executing: not ours to clear
                pass
            else:
                tb.tb_frame.f_locals  # noqa: B018 - reading syncs it with the cleared frame
            tb = tb.tb_next
