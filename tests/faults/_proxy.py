"""A userspace TCP fault proxy: added latency, lost connections and a cut link, on command.

The kernel here has no `netem` qdisc, so network faults between the hub and a node are made
in userspace instead: the hub dials this proxy (LocalFederation.hub_addresses) and the proxy
forwards bytes to the node. It works at layer 4, so mutual TLS passes through unchanged and
both ends still check each other's certificates; the proxy never sees a plaintext byte.

Faults, each switched at any time from the test's thread:
- latency_s: every chunk is delivered that long after it was read, in each direction (so a
  round trip gains twice as much), in order;
- loss: the probability that a chunk is lost; a stream protocol cannot lose bytes and go
  on, so a lost chunk resets its connection (both sides see a reset, as after a dropped
  TCP session), and gRPC must reconnect;
- cut(): a black hole: bytes are read and thrown away, new connections are accepted and
  never answered, so callers see silence rather than a refusal; heal() forwards again
  (connections that lost bytes while cut are reset, as their TLS streams are broken);
- reset(): reset every open connection at once.

Run as a module it serves one link until killed (used inside a network namespace):
`python -m tests.faults._proxy --listen HOST:PORT --upstream HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

CHUNK = 64 * 1024


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass(eq=False)  # identity, so that links can live in a set
class _Link:
    """One proxied connection: the caller's side and the node's side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    broken: bool = False  # lost bytes while the link was cut: its stream cannot recover

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


@dataclass
class ProxyStats:
    """What the proxy has done, for tests to assert that a fault really happened."""

    connections: int = 0
    chunks: int = 0
    lost: int = 0  # chunks lost (each reset its connection)
    discarded: int = 0  # chunks thrown away while cut
    resets: int = 0


@dataclass
class FaultProxy:
    """Forward TCP from a local port to upstream, adding the faults set on it."""

    upstream: tuple[str, int] | None = None  # may be set once the node's port is known
    host: str = "127.0.0.1"
    port: int = 0
    latency_s: float = 0.0
    loss: float = 0.0
    stats: ProxyStats = field(default_factory=ProxyStats)
    _cut: bool = False
    _links: set[_Link] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _random: random.Random = field(default_factory=random.Random)

    @property
    def address(self) -> str:
        """host:port callers dial."""
        return f"{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether the link is cut (a black hole)."""
        return self._cut

    # control, from any thread ------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen (on a free port if port is 0) and serve from a background thread."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(timeout=10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and end the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(timeout=10)
        self._loop = None

    def cut(self) -> None:
        """Stop forwarding: a black hole in both directions, for open and new connections."""
        self._cut = True

    def heal(self) -> None:
        """Forward again; connections that lost bytes while cut are reset."""
        self._cut = False
        self._call(self._reset_broken())

    def reset(self) -> None:
        """Reset every open connection (as if the network dropped them all)."""
        self._call(self._reset_all_async())

    # the event loop's side ---------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.abort()
            self.stats.resets += 1
        self._links.clear()

    async def _reset_all_async(self) -> None:
        self._reset_all()

    async def _reset_broken(self) -> None:
        for link in [x for x in self._links if x.broken]:
            link.abort()
            self.stats.resets += 1
            self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        link = _Link(client=writer)
        self._links.add(link)
        try:
            while self._cut:  # a black hole answers nothing, not even a refusal
                if not await reader.read(CHUNK):
                    return
                self.stats.discarded += 1
                link.broken = True
            if link.broken or self.upstream is None:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # the node is down: the caller sees its connection closed
            link.upstream = up_writer
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        finally:
            link.abort()
            self._links.discard(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction, delivering each chunk latency_s after it was read."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self._cut:
                    self.stats.discarded += 1
                    link.broken = True
                    continue
                writer.write(data)
                await writer.drain()

        delivery = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(CHUNK):
                self.stats.chunks += 1
                if self._cut:
                    self.stats.discarded += 1
                    link.broken = True
                    continue
                if self.loss and self._random.random() < self.loss:
                    self.stats.lost += 1
                    link.abort()
                    return
                queue.put_nowait((loop.time() + self.latency_s, data))
            queue.put_nowait(None)
            await delivery
        except (ConnectionError, OSError):
            pass
        finally:
            delivery.cancel()
            link.abort()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    """Serve one link until killed; print the listening address once ready."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    args = ap.parse_args()
    host, port = _split(args.listen)
    proxy = FaultProxy(upstream=_split(args.upstream), host=host, port=port).start()
    sys.stdout.write(f"ready {proxy.address}\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    main()
