"""The HTTP transport: hypercorn's trio server over client connections that must keep up.

hypercorn writes each response chunk with ``send_all`` inside a shielded cancel scope and no
timeout, so a client that stops reading could hold a request - and a graceful shutdown that
waits for it - forever. Here every accepted connection is a :class:`GuardedStream`:

- a write that makes no progress for ``stall_timeout_s`` closes the connection and is
  remembered as a stall (the job of that request ends ``client_stalled``);
- :meth:`Connections.abort_all` closes every connection at once, which wakes any write
  blocked on it: the shutdown's hard deadline.

:func:`serve_http` is hypercorn's own ``worker_serve`` (trio), cut down to plain TCP
listeners and given these streams; everything else is hypercorn's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)

Peer = tuple[str, int]
_STALLS_KEPT = 1024


class Connections:
    """Every client connection the server holds."""

    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._open: set[GuardedStream] = set()
        self._stalled: dict[Peer, float] = {}  # peer -> when its connection was closed
        self.stalls = 0

    def __len__(self) -> int:
        return len(self._open)

    def blocked(self, for_s: float) -> int:
        """Connections whose current write has waited ``for_s`` seconds or more."""
        now = trio.current_time()
        return sum(1 for s in self._open
                   if s.writing_since is not None and now - s.writing_since >= for_s)

    def was_stalled(self, peer: Peer | None) -> bool:
        return peer is not None and tuple(peer) in self._stalled

    def close_idle(self, busy: Callable[[Peer | None], bool]) -> int:
        """Close, with a FIN, every connection with no request in flight (hypercorn's own
        graceful close leaves idle keep-alive connections open until its timeout)."""
        idle = [stream for stream in self._open if not busy(stream.peer)]
        for stream in idle:
            stream.close_idle()
        return len(idle)

    def abort_all(self) -> int:
        """Close every open connection now; returns how many there were."""
        streams = list(self._open)
        for stream in streams:
            stream.abort()
        return len(streams)

    def _add(self, stream: GuardedStream) -> None:
        self._open.add(stream)
        # A new connection from a client port that once stalled is a new client.
        self._stalled.pop(stream.peer, None)  # type: ignore[arg-type]

    def _discard(self, stream: GuardedStream) -> None:
        self._open.discard(stream)

    def _stall(self, peer: Peer | None) -> None:
        self.stalls += 1
        if peer is not None:
            self._stalled[peer] = time.monotonic()
            while len(self._stalled) > _STALLS_KEPT:
                del self._stalled[next(iter(self._stalled))]


class GuardedStream(trio.abc.HalfCloseableStream):
    """A client's TCP connection whose writes must make progress."""

    def __init__(self, inner: trio.SocketStream, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections
        self.socket = inner.socket  # hypercorn reads the addresses from it
        try:
            self.peer = parse_socket_addr(inner.socket.family, inner.socket.getpeername())
        except OSError:
            self.peer = None
        self.writing_since: float | None = None  # trio clock: a write waiting for the socket
        connections._add(self)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """``SocketStream.send_all``, with a deadline on each piece of progress."""
        stall_s = self._connections.stall_timeout_s
        with memoryview(data) as view:
            if not view:
                await self._inner.send_all(b"")
                return
            sent = 0
            while sent < len(view):
                self.writing_since = trio.current_time()
                with trio.move_on_after(stall_s) as waited:
                    try:
                        sent += await self.socket.send(view[sent:])
                    except OSError as exc:
                        raise trio.BrokenResourceError(str(exc)) from exc
                    finally:
                        self.writing_since = None
                if waited.cancelled_caught:
                    self._connections._stall(self.peer)
                    self.abort()
                    raise trio.BrokenResourceError(
                        f"the client took no bytes for {stall_s:g} s")

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    def close_idle(self) -> None:
        """End an idle connection: FIN first, so the client sees an orderly close."""
        try:
            self.socket.shutdown(trio.socket.SHUT_WR)
        except OSError:
            pass
        self.abort()

    def abort(self) -> None:
        """Close the socket now; a task blocked on it wakes with ClosedResourceError."""
        self._connections._discard(self)
        self.socket.close()

    async def aclose(self) -> None:
        self._connections._discard(self)
        await self._inner.aclose()


class _GuardedListener(trio.abc.Listener[GuardedStream]):
    def __init__(self, inner: trio.SocketListener, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections

    async def accept(self) -> GuardedStream:
        return GuardedStream(await self._inner.accept(), self._connections)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def serve_http(
    app: Any,
    config: HypercornConfig,
    connections: Connections,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns, then close gracefully: each
    connection gets ``config.graceful_timeout`` to finish what it is sending."""
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                listeners.append(_GuardedListener(listener, connections))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(partial(
                        trio.serve_listeners,
                        partial(TCPServer, wrapped, config, context,
                                ConnectionState(lifespan_state.copy())),
                        listeners, handler_nursery=server_nursery,
                    ))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
