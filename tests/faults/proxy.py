"""A TCP proxy on 127.0.0.1 that delays what a server answers: latency on demand.

It runs its own event loop in a thread, so the delay it adds does not depend on how busy
the test's event loop is, and works the same for in-process and subprocess clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class LatencyProxy:
    """Forwards every connection to ``127.0.0.1:upstream_port``; each chunk the upstream
    sends back is held ``delay`` seconds (set it at any time; order is kept).

    ``open`` counts the client connections open now, ``peak`` the most at once since
    :meth:`reset_peak`, ``accepted`` all of them.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.open = 0
        self.peak = 0
        self.accepted = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(5.0), "the proxy did not start"

    def reset_peak(self) -> None:
        self.peak = self.open

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
        finally:
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancelled only by close(): end quietly (asyncio would log a cancelled handler).
        self._writers.add(writer)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._proxy(reader, writer)
        finally:
            self._writers.discard(writer)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
            except OSError:
                return
            try:
                await asyncio.gather(
                    self._pump(reader, up_writer, delayed=False),
                    self._pump(up_reader, writer, delayed=True),
                )
            finally:
                up_writer.close()
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        if target.can_write_eof():
                            target.write_eof()
                    return
                target.write(data)
                await target.drain()

        sender = loop.create_task(forward())
        try:
            while not sender.done():
                try:
                    data = await source.read(65536)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + (self.delay if delayed else 0.0), data))
                if not data:
                    break
            await sender
        except (OSError, ConnectionError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender
            target.close()

    def close(self) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Let the closed transports finish closing their sockets before the loop stops
            # (else they are collected unclosed, a ResourceWarning in a later test).
            for writer in list(self._writers):
                writer.transport.abort()
            for _ in range(5):
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
