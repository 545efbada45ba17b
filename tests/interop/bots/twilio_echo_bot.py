"""A Pipecat telephony bot for Twilio Media Streams, echoing the caller's audio.

FastAPI + uvicorn; the `/ws` route reads the opening messages (`connected`, `start`) with
Pipecat's own `pipecat.runner.utils.parse_telephony_websocket`, as Pipecat's runner does,
then runs `FastAPIWebsocketTransport` with `TwilioFrameSerializer` (auto hang-up off, so
no credentials). Echo: every inbound `media` goes back out as outbound `media`. On a
`dtmf` digit the bot sends a `mark` named `dtmf-{digit}` after the audio echoed so far, as
a bot tracks playback; Twilio answers a mark once that audio has played, and the bot
reports each answer it reads.

TwilioFrameSerializer reads `media` and `dtmf` and ignores `mark`; the one addition here,
`MarkReadingSerializer`, hands an inbound `mark` to the pipeline as a transport message.

Reports (JSON lines on stdout): `listening` {port}, `start` {what the parser read},
`dtmf` {digit}, `mark` {name}, `ended` {frames and bytes echoed}.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from common import report, serve
from fastapi import FastAPI, Header, WebSocket
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 8_000  # Hz, Twilio's rate: the pipeline does not resample

app = FastAPI()


class MarkReadingSerializer(TwilioFrameSerializer):
    async def deserialize(self, data: str | bytes) -> Frame | None:
        message = json.loads(data)
        if isinstance(message, dict) and message.get("event") == "mark":
            return InputTransportMessageFrame(message=message)
        return await super().deserialize(data)


class TwilioEcho(FrameProcessor):
    def __init__(self, stream_sid: str) -> None:
        super().__init__()
        self.stream_sid = stream_sid
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
        elif isinstance(frame, InputDTMFFrame):
            digit = frame.button.value
            report("dtmf", digit=digit)
            # Not urgent: the output transport sends it after the audio queued before it.
            await self.push_frame(OutputTransportMessageFrame(message={
                "event": "mark", "streamSid": self.stream_sid,
                "mark": {"name": f"dtmf-{digit}"}}))
        elif isinstance(frame, InputTransportMessageFrame):
            if frame.message.get("event") == "mark":
                report("mark", name=frame.message.get("mark", {}).get("name"),
                       stream_sid=frame.message.get("streamSid"))
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)


@app.websocket("/ws")
async def websocket_endpoint(
    websocket: WebSocket,
    x_daily_session_id: Annotated[str | None, Header()] = None,
) -> None:
    await websocket.accept()
    transport_type, call_data = await parse_telephony_websocket(websocket)
    report("start", transport_type=transport_type, stream_id=call_data.stream_id,
           call_id=call_data.call_id, body=call_data.body, session_id=x_daily_session_id,
           path=websocket.url.path)
    assert call_data.stream_id is not None, "no streamSid in the start message"
    serializer = MarkReadingSerializer(
        stream_sid=call_data.stream_id, call_sid=call_data.call_id,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False,
            serializer=serializer),
    )
    echo = TwilioEcho(call_data.stream_id)
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
    report("ended", frames=echo.frames, bytes=echo.bytes)


if __name__ == "__main__":
    serve(app)
