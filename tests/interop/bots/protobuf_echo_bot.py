"""A Pipecat bot as the hosted service runs one, echoing input audio as output audio.

FastAPI + uvicorn, `FastAPIWebsocketTransport` with `ProtobufFrameSerializer` (the
transport and serializer the Pipecat JS and Python WebSocket clients speak). Like the
hosted service's base image, the `/ws` route reads the session's body from `?body=`
(standard base64 of the JSON, percent-encoded in the URL) and the session id from the
`X-Daily-Session-Id` header, and hands both to the bot as Pipecat's
`WebSocketRunnerArguments`. No external service, no VAD or STT: every input audio frame
goes back out as an output audio frame.

Reports (JSON lines on stdout): `listening` {port}, `session` {what the route read},
`ended` {frames and bytes echoed}.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from common import report, serve
from fastapi import FastAPI, Header, Query, WebSocket
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.types import WebSocketRunnerArguments
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16_000  # Hz, in and out: no resampling, so the echo is sample-exact

app = FastAPI()


class AudioEcho(FrameProcessor):
    """Each input audio frame goes out again as an output audio frame."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0
        self.bytes = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.frames += 1
            self.bytes += len(frame.audio)
            await self.push_frame(OutputAudioRawFrame(
                audio=frame.audio, sample_rate=frame.sample_rate,
                num_channels=frame.num_channels))
        else:
            await self.push_frame(frame, direction)


async def bot(runner_args: WebSocketRunnerArguments) -> None:
    transport = FastAPIWebsocketTransport(
        websocket=runner_args.websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False,
            serializer=ProtobufFrameSerializer()),
    )
    echo = AudioEcho()
    worker = PipelineWorker(
        Pipeline([transport.input(), echo, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE,
                              audio_out_sample_rate=SAMPLE_RATE),
    )

    # Pipecat's event_handler decorator has no annotations (untyped in pipecat-ai).
    @transport.event_handler("on_client_disconnected")  # type: ignore[untyped-decorator]
    async def on_client_disconnected(_transport: Any, _websocket: Any) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    report("ended", session_id=runner_args.session_id, frames=echo.frames, bytes=echo.bytes)


@app.websocket("/ws")
async def websocket_endpoint(
    websocket: WebSocket,
    x_daily_session_id: Annotated[str | None, Header()] = None,
    body: Annotated[str | None, Query()] = None,
) -> None:
    await websocket.accept()
    decoded = None
    if body is not None:
        # validate=True: the gateway must send standard base64, not the URL-safe kind
        decoded = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    report(
        "session",
        path=websocket.url.path,
        query_names=[name for name, _ in websocket.query_params.multi_items()],
        session_id=x_daily_session_id,
        body=decoded,
        # every copy of each header, so a forged duplicate cannot hide behind the first
        session_id_headers=websocket.headers.getlist("x-daily-session-id"),
        relay_session_id_headers=websocket.headers.getlist("x-relay-session-id"),
        authorization=websocket.headers.getlist("authorization"),
    )
    await bot(WebSocketRunnerArguments(websocket=websocket, body=decoded,
                                       session_id=x_daily_session_id))


if __name__ == "__main__":
    serve(app)
