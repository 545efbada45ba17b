"""relay: a self-hosted WebSocket gateway for real-time voice and media bots, on Trio."""

from __future__ import annotations

__all__: list[str] = []
