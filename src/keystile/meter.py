"""The send (and receive) of an admitted HTTP request, as the middleware wraps them."""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import Message, Receive, Send

from keystile.responses import Headers

__all__ = ["Meter"]


class Meter:
    """The send (and receive) of an admitted HTTP request: adds the rate-limit and CORS
    ``headers`` to the response, and counts body bytes in and out, and the status.

    Made as ``Meter()``, every slot then set by its maker (the middleware, on every
    request): a class with no ``__init__`` of its own is made in C, where a Python
    ``__init__`` cost a call."""

    __slots__ = ("_receive", "_send", "bytes_in", "bytes_out", "headers", "status")

    _receive: Receive
    _send: Send
    bytes_in: int
    bytes_out: int
    headers: Headers
    status: int

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.bytes_in += len(message.get("body", b""))
        return message

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine: it counts, then hands back what the next send returns for the
        # app to await, so a message costs one plain call here rather than a coroutine.
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
            headers = self.headers
            if headers:
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
        send = self._send  # an attribute, then a call: 3.11 specializes a slot's LOAD_ATTR
        return send(message)
