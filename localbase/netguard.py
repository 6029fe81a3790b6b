"""Connection limits for secure mode: one device on the clinic network must not take localbase down.

aiohttp alone holds any number of connections, each for as long as the peer likes (a connection
that sends half a request head and then nothing stays open for an hour), so a few hundred "slow"
connections exhaust the process's open files; asyncio then stops accepting for a second at a time
and every other client fails. This module accepts connections itself and decides at once:

* a cap on connections per client IP address (programs on this machine exempt, see
  :mod:`localbase.security`): the excess is closed immediately, before any work is done for it;
* a cap on the connections of the whole process, derived from its open-file limit: at the cap the
  connection idle the longest (not serving a request) is dropped for the newcomer, so half-open
  connections cannot crowd out a real request; if the process still runs out of descriptors, the
  same eviction makes room instead of pausing the listener;
* a watchdog that drops a connection whose request body stops arriving for ``body_idle_s``
  (while the server is reading it: a body the server itself paused is not the client's fault).

Accepted sockets are handed to asyncio with ``loop.connect_accepted_socket`` and then served by
aiohttp's own protocol, wrapped only for accounting. Request heads that do not arrive within
``header_timeout_s`` are aiohttp's keep-alive timeout (it runs from the connection's start and from
each answer and is not extended by partial data), which :mod:`localbase.server` sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from localbase.security import Limits, connection_is_local

log = logging.getLogger("localbase.netguard")

ACCEPTS_PER_WAKEUP = 16  # bounds the descriptors taken between two admission decisions
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Conn:
    __slots__ = ("transport", "ip", "exempt", "opened", "active", "last_rx")

    def __init__(self, ip: str, exempt: bool):
        self.transport: asyncio.BaseTransport | None = None  # set once asyncio made the transport
        self.ip = ip
        self.exempt = exempt
        self.opened = time.monotonic()
        self.active = 0  # requests being handled on this connection
        self.last_rx = self.opened


class _GuardedProtocol(asyncio.Protocol):
    """Wraps one aiohttp ``RequestHandler``: connects the accounting record to the transport."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol, conn: _Conn):
        self._guard = guard
        self._inner = inner
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.attach(self._conn, transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._conn.last_rx = time.monotonic()
        self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.release(self._conn)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionGuard:
    """Accounting for every connection of one localbase process (all three ports)."""

    def __init__(self, limits: Limits, trust_local: bool = True):
        self.limits = limits
        self.trust_local = trust_local
        self.conns: set[_Conn] = set()
        self.by_transport: dict[asyncio.BaseTransport, _Conn] = {}
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0
        self.body_timeouts = 0
        # id(request) -> (request, its connection, body bytes seen, when that count last changed)
        self._bodies: dict[int, tuple[web.BaseRequest, _Conn, int, float]] = {}
        self._sweeper: asyncio.Task | None = None

    # ---- admission ------------------------------------------------------------------------------
    def admit(self, peer: str, local_address: str | None) -> _Conn | None:
        """An accounting record for a newly accepted connection, or None to close it at once."""
        exempt = self.trust_local and connection_is_local(peer, local_address)
        cap = self.limits.connections_per_client
        if not exempt and cap is not None and self.per_ip.get(peer, 0) >= cap:
            self.refused += 1
            return None
        total = self.limits.max_connections
        if total is not None and len(self.conns) >= total and not self.evict_idlest():
            self.refused += 1
            return None
        conn = _Conn(peer, exempt)
        self.conns.add(conn)
        self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
        return conn

    def attach(self, conn: _Conn, transport: asyncio.BaseTransport) -> None:
        conn.transport = transport
        self.by_transport[transport] = conn

    def evict_idlest(self) -> bool:
        """Drop the connection that has waited longest without serving a request; False if every
        connection is busy serving one (or still in its TLS handshake)."""
        idle = [c for c in self.conns if c.active == 0 and c.transport is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_rx)
        self.evicted += 1
        self.release(victim)
        assert victim.transport is not None
        victim.transport.abort()  # its descriptor closes on the loop's next turn
        return True

    def release(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if conn.transport is not None:
            self.by_transport.pop(conn.transport, None)
        left = self.per_ip.get(conn.ip, 1) - 1
        if left > 0:
            self.per_ip[conn.ip] = left
        else:
            self.per_ip.pop(conn.ip, None)

    # ---- requests -------------------------------------------------------------------------------
    def middleware(self) -> Callable[..., Any]:
        """Marks connections busy while they serve a request and watches request bodies."""

        @web.middleware
        async def guard(request: web.Request, handler):
            conn = self.by_transport.get(request.transport) if request.transport is not None else None
            if conn is None:
                return await handler(request)
            conn.active += 1
            watched = (self.limits.body_idle_s is not None and request.body_exists
                       and not request.content.is_eof())
            if watched:
                self._bodies[id(request)] = (request, conn, request.content.total_bytes, time.monotonic())
            try:
                return await handler(request)
            finally:
                conn.active -= 1
                conn.last_rx = time.monotonic()
                if watched:
                    self._bodies.pop(id(request), None)

        return guard

    async def start(self) -> None:
        if self.limits.body_idle_s is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_bodies())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_bodies(self) -> None:
        idle_s = float(self.limits.body_idle_s or 0)
        tick = max(0.2, min(1.0, idle_s / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for key, (request, conn, seen, since) in list(self._bodies.items()):
                content = request.content
                transport = conn.transport
                if content.is_eof() or transport is None:
                    self._bodies.pop(key, None)
                    continue
                reading = getattr(transport, "is_reading", lambda: True)()
                if content.total_bytes != seen or not reading:
                    self._bodies[key] = (request, conn, content.total_bytes, now)
                elif now - since >= idle_s:
                    self._bodies.pop(key, None)
                    self.body_timeouts += 1
                    log.info("dropping %s: its request body stopped arriving for %.0f s", conn.ip, idle_s)
                    transport.abort()

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.conns), "refused": self.refused, "evicted": self.evicted,
                "body_timeouts": self.body_timeouts}


def _ip(address: Any) -> str:
    if isinstance(address, tuple | list) and address:
        return str(address[0]).split("%", 1)[0]
    return ""


class _Acceptor:
    """A listening socket whose connections pass the guard before asyncio and aiohttp see them.

    It stands where an ``asyncio.Server`` would in an aiohttp site (``sockets``, ``close()``)."""

    def __init__(self, sock: socket.socket, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol],
                 tls: ssl.SSLContext | None, handshake_timeout: float | None):
        self.sockets = [sock]
        self._sock = sock
        self._guard = guard
        self._factory = factory
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn_sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # Out of descriptors after all: make room now rather than stop listening.
                    if not self._guard.evict_idlest():
                        self._pause(0.1)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("accept failed: %s", exc)
                self._pause(0.1)
                return
            try:
                local_address = _ip(conn_sock.getsockname())
            except OSError:
                conn_sock.close()
                continue
            conn = self._guard.admit(_ip(address), local_address)
            if conn is None:
                conn_sock.close()  # refused: its descriptor is released right here
                continue
            conn_sock.setblocking(False)
            task = self._loop.create_task(self._serve(conn_sock, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pause(self, seconds: float) -> None:
        self._loop.remove_reader(self._sock.fileno())

        def resume() -> None:
            if not self._closed:
                self._loop.add_reader(self._sock.fileno(), self._on_readable)

        self._loop.call_later(seconds, resume)

    async def _serve(self, conn_sock: socket.socket, conn: _Conn) -> None:
        guard, factory = self._guard, self._factory
        options: dict[str, Any] = {}
        if self._tls is not None:
            options = {"ssl": self._tls, "ssl_handshake_timeout": self._handshake_timeout or 60.0}
        try:
            await self._loop.connect_accepted_socket(lambda: _GuardedProtocol(guard, factory(), conn),
                                                     conn_sock, **options)
        except Exception as exc:  # a failed TLS handshake, a peer gone before we started
            guard.release(conn)
            conn_sock.close()
            log.debug("connection from %s not started: %s", conn.ip, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._tasks:
            task.cancel()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    __slots__ = ("_host", "_port", "_guard", "_handshake_timeout")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 512):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._handshake_timeout = guard.limits.header_timeout_s

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        family, kind, proto, _, address = socket.getaddrinfo(self._host or "0.0.0.0", self._port,
                                                             type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = _Acceptor(sock, self._guard, server, self._ssl_context,  # type: ignore[assignment]
                                 self._handshake_timeout)
