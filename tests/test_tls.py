"""TLS on both planes (certfile/keyfile), and wss:// upstream bots, with certs from trustme."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
import trustme
from support import bot_server, make_config, running
from trio_websocket import WebSocketRequest, open_websocket_url, serve_websocket

from relay.config import Config, build_config


def _cert_files(tmp_path: Path) -> tuple[trustme.CA, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return ca, str(cert_path), str(key_path)


def _tls_config(bot: str, cert: str, key: str) -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "certfile": cert, "keyfile": key, "ping_interval": 1000,
                "ping_timeout": 1000, "public_url": "wss://127.0.0.1:8700"},
        agents={"a": {"bot": bot}},
    )


async def test_data_plane_speaks_wss_with_certfile_and_keyfile(tmp_path: Path) -> None:
    ca, cert, key = _cert_files(tmp_path)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    config = _tls_config("python:relay.echo:echo_bot", cert, key)
    async with running(config) as gw:
        host, port = gw.ports.ws[0]
        url = f"wss://{host}:{port}/ws/generic/a.local"
        with trio.fail_after(10):
            async with open_websocket_url(url, ssl_context=client_ctx) as ws:
                await ws.send_message("over tls")
                assert await ws.get_message() == "over tls"
                await ws.send_message(b"\x00" * 70000)
                assert await ws.get_message() == b"\x00" * 70000


async def test_plain_client_on_a_tls_listener_is_dropped_and_server_keeps_serving(
    tmp_path: Path,
) -> None:
    ca, cert, key = _cert_files(tmp_path)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    config = _tls_config("python:relay.echo:echo_bot", cert, key)
    async with running(config) as gw:
        host, port = gw.ports.ws[0]
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /ws/generic/a.local HTTP/1.1\r\nhost: x\r\n\r\n")
            # Not a TLS ClientHello: the TLS handshake fails and the connection is dropped.
            with trio.fail_after(5):
                while await stream.receive_some(100):
                    pass
            await stream.aclose()
            async with open_websocket_url(f"wss://{host}:{port}/ws/generic/a.local",
                                          ssl_context=client_ctx) as ws:
                await ws.send_message("still serving")
                assert await ws.get_message() == "still serving"


async def test_wss_upstream_bot_is_dialled_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    seen: list[str | bytes] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        message = await ws.get_message()
        seen.append(message)
        await ws.send_message(message)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, server_ctx)
        config = make_config(f"wss://127.0.0.1:{server.port}/bot")
        async with running(config, bot_ssl=trust) as gw:
            with trio.fail_after(10):
                async with open_websocket_url(gw.url()) as ws:
                    await ws.send_message("to a wss bot")
                    assert await ws.get_message() == "to a wss bot"
        assert seen == ["to a wss bot"]
        nursery.cancel_scope.cancel()


async def test_wss_bot_with_untrusted_certificate_is_502(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def handler(request: WebSocketRequest) -> None:
        await request.accept()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, server_ctx)
        config = make_config(f"wss://127.0.0.1:{server.port}/bot")
        async with running(config) as gw, bot_server():
            host, port = gw.ports.ws[0]
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(
                    b"GET /ws/generic/a.local HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                    b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
                await stream.aclose()
            assert data.startswith(b"HTTP/1.1 502")
            assert b'"code":"bad_gateway"' in data
        nursery.cancel_scope.cancel()
