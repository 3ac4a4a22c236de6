"""Client interceptors that send the caller's protocol version with every call.

Every channel chc opens with mutual TLS (protocols/security/tls.secure_channel) carries them,
so nodes and the hub can refuse a caller of another major version before doing anything
(protocols/version.py, protocols/rpc.guarded). gRPC's interceptors are the documented way to
add metadata to every call of a channel without touching each call site.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from protocols.version import metadata

# gRPC's interceptor classes are generic in its type stubs only.
if TYPE_CHECKING:
    _UU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.StreamStreamClientInterceptor[Any, Any]
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUS = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _AioSU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _AioSS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UU = grpc.UnaryUnaryClientInterceptor
    _US = grpc.UnaryStreamClientInterceptor
    _SU = grpc.StreamUnaryClientInterceptor
    _SS = grpc.StreamStreamClientInterceptor
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor
    _AioUS = grpc.aio.UnaryStreamClientInterceptor
    _AioSU = grpc.aio.StreamUnaryClientInterceptor
    _AioSS = grpc.aio.StreamStreamClientInterceptor


def _with_version(details: Any) -> Any:
    # Both gRPC's blocking and asyncio call details are namedtuples.
    extra = list(details.metadata or ()) + list(metadata())
    return details._replace(metadata=extra)


class VersionInterceptor(
    _UU,
    _US,
    _SU,
    _SS,
):
    """Adds the `chc-protocol` metadata to every call of a blocking channel."""

    def _go(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_version(details), request)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary calls."""
        return self._go(continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming calls."""
        return self._go(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Client-streaming calls."""
        return self._go(continuation, details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Bidirectional calls."""
        return self._go(continuation, details, requests)


class _AioUnaryUnary(_AioUU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_version(details), request)


class _AioUnaryStream(_AioUS):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_version(details), request)


class _AioStreamUnary(_AioSU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_version(details), requests)


class _AioStreamStream(_AioSS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_version(details), requests)


def aio_interceptors() -> list[Any]:
    """The same, for a grpc.aio channel (one interceptor per kind of call)."""
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]
