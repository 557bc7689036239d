"""The HTTP server of ``captioner serve``: gunicorn's arbiter with workers whose connections are read
by waitress's event loop.

Why not gunicorn's own ``gthread`` worker: it hands a connection to a thread of the pool as soon as
its first bytes arrive, and that thread then reads the request blocking. A client that sends
``POST /predict HTTP/1.1`` and stalls, or uploads a few bytes a second, holds a thread; as many such
clients as threads and the gateway answers nothing, ``/health`` included. Here one event loop per
worker process reads every connection without blocking and buffers the whole request (headers and
body, large bodies spooled to a temporary file) before a thread runs the app, so a slow client costs
a socket and a buffer, never a thread. Requests whose headers take longer than
``header_timeout_seconds`` and connections silent for ``client_timeout_seconds`` are closed; bodies
larger than twice the upload limit are refused without reading them.

gunicorn's arbiter is kept for what it does well: several worker processes, restarts of a dead
worker, graceful stops, and the ``child_exit`` hook that drops a dead worker's Prometheus samples.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gunicorn.workers.base import Worker

#: How often the event loop wakes up when nothing happens (heartbeat to the arbiter, timeouts).
_TICK_SECONDS = 0.5


class BufferingWorker(Worker):
    """A gunicorn worker serving its listening sockets with waitress (see the module docstring).

    ``server_options`` holds the timeouts and limits; :func:`worker_class` binds them.
    """

    server_options: dict[str, Any] = {}

    def run(self) -> None:
        from waitress import wasyncore
        from waitress.channel import HTTPChannel
        from waitress.server import BaseWSGIServer, create_server

        options = dict(self.server_options)
        header_timeout = float(options.pop("header_timeout", 10.0))
        socket_map: dict[int, Any] = {}
        server = create_server(
            self.wsgi, map=socket_map, sockets=[getattr(s, "sock", s) for s in self.sockets],
            threads=self.cfg.threads, ident="captioner", asyncore_use_poll=True,  # select() stops at fd 1024
            cleanup_interval=1, **options)
        next_check = 0.0
        while self.alive:
            self.notify()
            wasyncore.loop(timeout=_TICK_SECONDS, map=socket_map, use_poll=True, count=1)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _TICK_SECONDS
                _close_slow_headers(socket_map, now, header_timeout, HTTPChannel)
            if self.ppid != os.getppid():  # the arbiter is gone
                break

        # Graceful stop: accept nothing more, let requests already read finish and be written out.
        for dispatcher in list(socket_map.values()):
            if isinstance(dispatcher, BaseWSGIServer):
                dispatcher.accepting = False
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline and any(
                isinstance(c, HTTPChannel) and (c.requests or c.total_outbufs_len) for c in list(socket_map.values())):
            self.notify()
            wasyncore.loop(timeout=0.1, map=socket_map, use_poll=True, count=1)
        server.task_dispatcher.shutdown(timeout=max(0.0, deadline - time.monotonic()))
        wasyncore.close_all(socket_map)


def _close_slow_headers(socket_map: dict, now: float, timeout: float, channel_type: type) -> None:
    """Close connections whose request line and headers are not complete ``timeout`` seconds after their
    first byte (waitress itself only closes connections that are silent, so a trickle would stay)."""
    for channel in list(socket_map.values()):
        if not isinstance(channel, channel_type):
            continue
        request = channel.request
        if request is None or request.headers_finished:
            continue
        seen = getattr(request, "_captioner_first_seen", None)
        if seen is None:
            request._captioner_first_seen = now
        elif now - seen > timeout and not channel.will_close:
            channel.will_close = True  # the loop closes it on its next pass


def worker_class(*, header_timeout: float, client_timeout: float, max_body_bytes: int, max_connections: int,
                 trusted_proxy: str = "127.0.0.1") -> type[BufferingWorker]:
    """A :class:`BufferingWorker` subclass with these limits, for gunicorn's ``worker_class`` setting (its
    thread count is gunicorn's ``threads``)."""
    options = {
        "header_timeout": header_timeout,
        "channel_timeout": max(1, int(round(client_timeout))),
        "max_request_body_size": max_body_bytes,
        "connection_limit": max_connections,
        # A proxy beside the gateway (the nginx sidecar) tells who the client is.
        "trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
        "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"},
        "clear_untrusted_proxy_headers": True, "log_untrusted_proxy_headers": False,
    }
    return type("BufferingWorker", (BufferingWorker,), {"server_options": options})


__all__ = ["BufferingWorker", "worker_class"]
