"""A Pipecat client: `WebsocketClientTransport` + `ProtobufFrameSerializer` in a pipeline.

Usage: protobuf_client.py URL TOKEN SEND_PCM RECEIVED_PCM

Connects to URL (a relay wsUrl) with `Authorization: Bearer TOKEN`, plays SEND_PCM (raw
16-bit mono PCM at 16 kHz) as the pipeline's output audio, records every input audio frame
that comes back until as many bytes have arrived, writes them to RECEIVED_PCM and leaves.

Reports (JSON lines on stdout): `connected`, then `done` {bytes, frames} or `timeout`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from common import report
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.websocket.client import WebsocketClientParams, WebsocketClientTransport
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16_000  # Hz, as the bot
BOUND = 60.0  # seconds for the whole exchange; the test has its own, larger bound


class Recorder(FrameProcessor):
    """Keeps the input audio; sets `done` once `expected` bytes have arrived."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.audio = bytearray()
        self.frames = 0
        self.done = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.frames += 1
            self.audio += frame.audio
            if len(self.audio) >= self.expected:
                self.done.set()
        else:
            await self.push_frame(frame, direction)


async def main(url: str, token: str, tone: bytes) -> bytes | None:
    """The audio that came back, or None when not all of it came within BOUND."""
    transport = WebsocketClientTransport(
        uri=url,
        params=WebsocketClientParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False,
            serializer=ProtobufFrameSerializer(),
            additional_headers={"Authorization": f"Bearer {token}"}),
    )
    recorder = Recorder(len(tone))
    worker = PipelineWorker(
        Pipeline([transport.input(), recorder, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE,
                              audio_out_sample_rate=SAMPLE_RATE),
        enable_rtvi=False,
    )

    # Pipecat's event_handler decorator has no annotations (untyped in pipecat-ai).
    @worker.event_handler("on_pipeline_started")  # type: ignore[untyped-decorator]
    async def on_pipeline_started(_worker: Any, _frame: Any) -> None:
        report("connected")
        await worker.queue_frames([OutputAudioRawFrame(
            audio=tone, sample_rate=SAMPLE_RATE, num_channels=1)])

    async def finish() -> None:
        try:
            await asyncio.wait_for(recorder.done.wait(), BOUND)
        except TimeoutError:
            report("timeout", bytes=len(recorder.audio), frames=recorder.frames)
        await worker.cancel()

    finisher = asyncio.create_task(finish())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    await finisher
    if not recorder.done.is_set():
        return None
    report("done", bytes=len(recorder.audio), frames=recorder.frames)
    return bytes(recorder.audio)


if __name__ == "__main__":
    url, token, send, received = sys.argv[1:5]
    audio = asyncio.run(main(url, token, Path(send).read_bytes()))
    if audio is None:
        sys.exit(1)
    Path(received).write_bytes(audio)
