"""Connection guards for the server: one client must not lock everyone else out.

uvicorn alone waits forever for a request head that never comes (an idle or slowloris
connection), and its ``limit_concurrency`` counts idle connections, so 64 of them turned
every other client away with 503. :func:`server_config` builds the uvicorn configuration
used by ``embedsearch serve`` instead:

- a request head must arrive within ``header_timeout`` seconds of the connection (or of
  the previous response), a request body within ``body_timeout`` seconds of its head;
  a connection that misses either is closed (idle keep-alive connections close after
  uvicorn's ``timeout_keep_alive``);
- at most ``max_connections`` connections in all and ``max_per_client`` per client
  address; further connections are closed at once, so idle ones never cause a 503 for
  requests on connections already accepted;
- request heads are limited in size by h11 (``h11_max_incomplete_event_size``).

Work per request is bounded elsewhere: upload size and pixel limits, the JPEG scan guard
(:mod:`embedsearch.data.jpeg_guard`) and the service's decode slots.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    import uvicorn

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
KEEP_ALIVE_TIMEOUT = 5
MAX_CONNECTIONS = 1000
MAX_PER_CLIENT = 256
MAX_HEAD_BYTES = 16 * 1024
#: How often each connection checks its deadlines (seconds).
TICK = 0.5


def _fd_room(wanted: int) -> int:
    """``wanted`` connections, or fewer when the open-file limit cannot hold them."""
    try:
        import resource  # POSIX only; Windows has no per-process open-file limit to raise
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + 128 and \
            (hard == resource.RLIM_INFINITY or hard > soft):
        # Raising the soft limit up to the hard one needs no privilege.
        new = wanted + 128 if hard == resource.RLIM_INFINITY else min(hard, wanted + 128)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 128))


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT,
                     body_timeout: float = BODY_TIMEOUT,
                     max_connections: int = MAX_CONNECTIONS,
                     max_per_client: int = MAX_PER_CLIENT) -> type[asyncio.Protocol]:
    """An h11 protocol class for uvicorn with the deadlines and limits above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._host = self.client[0] if self.client else ""
            per_client = _per_client(self.server_state)
            per_client[self._host] += 1
            self._phase: object = None
            self._since = time.monotonic()
            self._timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections or \
                    per_client[self._host] > max_per_client:
                self.logger.warning("refusing a connection from %s: %d open in all, %d from "
                                    "it", self._host, len(self.connections),
                                    per_client[self._host])
                transport.close()
                return
            self._timer = self.loop.call_later(TICK, self._check_deadlines)

        def connection_lost(self, exc: Exception | None) -> None:
            per_client = _per_client(self.server_state)
            per_client[self._host] -= 1
            if per_client[self._host] <= 0:
                del per_client[self._host]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def _check_deadlines(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            now = time.monotonic()
            phase = self.conn.their_state
            if phase is not self._phase:
                self._phase, self._since = phase, now
            waiting_head = phase is h11.IDLE and (self.cycle is None
                                                  or self.cycle.response_complete)
            late = ((waiting_head and now - self._since > header_timeout)
                    or (phase is h11.SEND_BODY and now - self._since > body_timeout))
            if late:
                self.logger.info("closing a connection from %s: no complete request %s in "
                                 "time", self._host,
                                 "head" if waiting_head else "body")
                self.transport.close()
                return
            self._timer = self.loop.call_later(TICK, self._check_deadlines)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request head gets a fresh header_timeout from now.
            self._phase, self._since = None, time.monotonic()

    return GuardedH11Protocol


def _per_client(state: Any) -> Counter[str]:
    counts = getattr(state, "embedsearch_per_client", None)
    if counts is None:
        counts = Counter()
        state.embedsearch_per_client = counts
    return counts


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                  header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                  max_connections: int = MAX_CONNECTIONS,
                  max_per_client: int = MAX_PER_CLIENT, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``embedsearch serve`` (``options`` go to uvicorn)."""
    import uvicorn

    room = _fd_room(max_connections)
    options.setdefault("timeout_keep_alive", KEEP_ALIVE_TIMEOUT)
    options.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(
        app, host=host, port=port,
        http=guarded_protocol(header_timeout, body_timeout, room, min(max_per_client, room)),
        # Idle connections are bounded above; uvicorn's own limit would count them and
        # answer 503 to everyone else.
        limit_concurrency=None,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES, **options)
