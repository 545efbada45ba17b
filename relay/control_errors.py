"""[trio] The error envelope on the answers hypercorn writes itself.

Most control-plane answers come from the app (`relay.control`), always with the envelope
`{"error", "code", "detail"}` (SPEC §4). A few never reach it: hypercorn answers a request
it cannot parse as HTTP/1.1 (a bad request line or header, a head over its 16 KiB bound)
or one the app ended without answering, with an empty body. SPEC rev 2 says no input
makes /start answer without the envelope, so for the servers relay starts (their config is
a `RelayHypercornConfig`) those answers get it too: same status, a JSON body, `Connection:
close`. Any other hypercorn server in the process (an embedding app's own) is untouched.

Hypercorn has no setting for this; `install()` wraps its two `_send_error_response`
methods (HTTP/1.1 protocol errors, and the per-request stream). If a hypercorn release
renames them, `install()` logs a warning and relay keeps hypercorn's plain answers; the
tests (tests/test_control_errors.py) fail first.
"""

from __future__ import annotations

import json
import logging
from itertools import chain
from time import time
from typing import Any

import h11
from hypercorn.config import Config as HypercornConfig

log = logging.getLogger("relay.control")

_INSTALLED = False
MAX_HEAD = 16384  # bytes: hypercorn's h11_max_incomplete_size, set by relay.control_server


class RelayHypercornConfig(HypercornConfig):
    """hypercorn's Config, marking a server whose own error answers carry the envelope."""


# status -> (code, error, detail); anything else gets a generic triple.
_ENVELOPES: dict[int, tuple[str, str, str]] = {
    400: ("bad_request", "Bad request.",
          "The request is not valid HTTP/1.1, so the gateway could not read it."),
    404: ("not_found", "Not found.", "No route for this request."),
    408: ("request_timeout", "Request timeout.",
          "The request did not arrive in time."),
    413: ("body_too_large", "Request body too large.", "The request body is too large."),
    414: ("uri_too_long", "Request target too long.",
          "The request line exceeds what the gateway reads."),
    431: ("headers_too_large", "Request headers too large.",
          f"The request head exceeds {MAX_HEAD} bytes."),
    500: ("internal_error", "Internal error.",
          "The gateway failed to answer this request; it has been logged."),
    501: ("not_implemented", "Not implemented.",
          "The gateway does not support this kind of request."),
}


def envelope(status: int) -> bytes:
    """The JSON body relay sends with ``status`` when hypercorn answers by itself."""
    code, error, detail = _ENVELOPES.get(
        status, ("http_error", f"HTTP {status}.", "The gateway could not serve this request."))
    return json.dumps({"error": error, "code": code, "detail": detail},
                      separators=(",", ":")).encode()


def envelope_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]


def _is_ours(protocol: Any) -> bool:
    return isinstance(getattr(protocol, "config", None), RelayHypercornConfig)


def install() -> None:
    """Give relay's hypercorn servers the envelope on their own error answers (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from hypercorn.protocol.events import Body, EndBody, Response
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
        h11_original = H11Protocol._send_error_response
        stream_original = HTTPStream._send_error_response
    except (ImportError, AttributeError) as exc:
        log.warning("this hypercorn has no error-answer hook relay knows (%s): its own "
                    "400/431 answers go without the JSON envelope", exc)
        _INSTALLED = True
        return

    async def h11_error(self: Any, status_code: int) -> None:
        if not _is_ours(self):
            await h11_original(self, status_code)
            return
        body = envelope(status_code)
        headers = list(chain(envelope_headers(body),
                             self.config.response_headers("h11")))
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def stream_error(self: Any, status_code: int) -> None:
        if not _is_ours(self):
            await stream_original(self, status_code)
            return
        body = envelope(status_code)
        await self.send(Response(stream_id=self.stream_id, status_code=status_code,
                                 headers=envelope_headers(body)))
        await self.send(Body(stream_id=self.stream_id, data=body))
        await self.send(EndBody(stream_id=self.stream_id))
        # and then, as hypercorn's own method does: the stream is done, the answer logged
        self.state = ASGIHTTPState.CLOSED
        await self.config.log.access(self.scope, {"status": status_code, "headers": []},
                                     time() - self.start_time)

    setattr(H11Protocol, "_send_error_response", h11_error)  # noqa: B010 - a wrap
    setattr(HTTPStream, "_send_error_response", stream_error)  # noqa: B010
    _INSTALLED = True
