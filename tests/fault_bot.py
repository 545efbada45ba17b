"""An upstream bot run as its own process by the fault tests (tests/test_faults.py) and
scripts/soak, so it can be killed (SIGKILL) or paused (SIGSTOP) for real.

    python tests/fault_bot.py          # prints "port N", then one line per event

Behaviour by request path:
  /echo      echo every message (also the default)
  /stream    echo, and send a binary message of 65536 bytes 50 times a second
  /half      echo; on the text message "half" send the first fragment of a text message
             (FIN clear), print "half-sent", and send nothing more
  /midframe  echo; on the text message "half" send the header and the first 100 bytes of
             a 1000-byte binary frame, print "half-sent", and send nothing more
  /garbage   answer the upgrade with bytes that are not HTTP, then close
Events printed (flushed): "port N", "open PATH", "closed PATH CODE" (a close frame came),
"gone PATH" (TCP ended without one), "half-sent".
"""

from __future__ import annotations

import struct
import sys
from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

STREAM_SIZE = 65536
STREAM_RATE = 50


def say(line: str) -> None:
    print(line, flush=True)


async def handle(stream: trio.SocketStream) -> None:
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
    except trio.BrokenResourceError:
        return
    path = head.split(b" ", 2)[1].decode("latin-1").split("?")[0]
    if path == "/garbage":
        try:
            await stream.send_all(b"SSH-2.0-OpenSSH_9.6 not a websocket\r\n\r\n\x00\xff")
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
        return
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(head)
    lock = trio.Lock()
    closed = False

    async def send(data: bytes) -> None:
        async with lock:
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:

        async def streamer() -> None:
            payload = b"\x5a" * STREAM_SIZE
            while True:
                await send(ws.send(Message(data=payload)))
                await trio.sleep(1 / STREAM_RATE)

        try:
            while True:
                for event in ws.events():
                    if isinstance(event, Request):
                        await send(ws.send(AcceptConnection()))
                        say(f"open {path}")
                        if path == "/stream":
                            nursery.start_soon(streamer)
                    elif isinstance(event, TextMessage | BytesMessage):
                        if path in ("/half", "/midframe") and event.data == "half":
                            if path == "/half":
                                await send(b"\x01\x05part1")  # text, FIN clear
                            else:
                                await send(struct.pack("!BBH", 0x82, 126, 1000) + b"h" * 100)
                            say("half-sent")
                            await trio.sleep_forever()
                        # One branch per kind: a Message holds str or bytes, never the union.
                        echo: Message[str] | Message[bytes | bytearray]
                        if isinstance(event, TextMessage):
                            echo = Message(data=event.data, message_finished=event.message_finished)
                        else:
                            echo = Message(data=event.data, message_finished=event.message_finished)
                        await send(ws.send(echo))
                    elif isinstance(event, Ping):
                        await send(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        closed = True
                        say(f"closed {path} {event.code}")
                        try:
                            await send(ws.send(event.response()))
                        except Exception:
                            pass
                        return
                data = await stream.receive_some(65536)
                if not data:
                    break
                ws.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if not closed:
                say(f"gone {path}")
            nursery.cancel_scope.cancel()
            await stream.aclose()


async def client(port: int, path: str) -> None:
    """--client PORT PATH: upgrade, print "connected", then read and drop everything;
    print "close CODE" for a close frame or "eof" when TCP ends without one."""
    from relay.frames import ControlFrame, FrameScanner, Violation, parse_close

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        "sec-websocket-version: 13\r\nsec-websocket-key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n"
        .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    head, _, rest = head.partition(b"\r\n\r\n")
    say("connected" if head.startswith(b"HTTP/1.1 101") else f"refused {head[:12]!r}")
    scanner = FrameScanner(masked=False, max_message_size=1 << 30)
    data = rest
    while True:
        for piece in scanner.feed(memoryview(data)):
            if isinstance(piece, ControlFrame) and piece.opcode == 8:
                say(f"close {parse_close(piece.payload)[0]}")
                return
            if isinstance(piece, Violation):
                say(f"violation {piece.close_code}")
                return
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            say("eof")
            return


async def main() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        say(f"port {listeners[0].socket.getsockname()[1]}")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["--client"]:
            trio.run(client, int(sys.argv[2]), sys.argv[3])
        else:
            trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
