"""Micro-benchmark for relay.frames.FrameScanner (not a test).

Feeds 100k masked binary frames of 320 payload bytes (a typical 10 ms audio packet) in
64 KiB chunks, as the client leg of the gateway sees them, and prints microseconds per frame.

    .venv/bin/python scripts/bench_frames.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.frames import OP_BINARY, FrameScanner, encode_frame

FRAMES = 100_000
PAYLOAD_SIZE = 320  # bytes per frame
CHUNK_SIZE = 64 * 1024  # bytes per feed() call, like one socket receive
ROUNDS = 5  # best of


def main() -> None:
    frame = encode_frame(OP_BINARY, os.urandom(PAYLOAD_SIZE), mask=True)
    stream = memoryview(frame * FRAMES)
    chunks = [stream[i : i + CHUNK_SIZE] for i in range(0, len(stream), CHUNK_SIZE)]
    best = float("inf")
    for _ in range(ROUNDS):
        scanner = FrameScanner(masked=True, max_message_size=1 << 20)
        t0 = time.perf_counter()
        for chunk in chunks:
            scanner.feed(chunk)
        best = min(best, time.perf_counter() - t0)
        assert scanner.messages == FRAMES and scanner.data_bytes == len(stream)
        assert not scanner.mid_frame
    print(
        f"{FRAMES} frames x {PAYLOAD_SIZE} B in {CHUNK_SIZE // 1024} KiB chunks: "
        f"{best * 1e6 / FRAMES:.3f} us/frame ({FRAMES / best / 1e6:.2f} M frames/s), "
        f"best of {ROUNDS}"
    )


if __name__ == "__main__":
    main()
