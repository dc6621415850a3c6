"""Alert webhooks, signed as the Standard Webhooks specification says
(https://www.standardwebhooks.com): each POST carries

- ``webhook-id`` — the message's id (``msg_`` + 24 random base62 characters), the same on
  every retry, so a receiver can drop a duplicate;
- ``webhook-timestamp`` — seconds since the epoch when it was (re)sent;
- ``webhook-signature`` — ``v1,`` + base64 of HMAC-SHA256 over ``id.timestamp.body`` under
  the secret, given as ``whsec_`` + base64 of 16 or more random bytes
  (``KEYSTILE_ALERT_WEBHOOK_SECRET``; :func:`new_secret` makes one).

Deliveries go out one at a time from a bounded queue (``max_queue``; past it, an alert is
dropped and counted in :attr:`WebhookSender.dropped`), over one ``httpx.AsyncClient``, each
try within ``timeout``; a try that fails (a connection error, a timeout, 429 or 5xx) is
retried up to ``retries`` times with doubling waits; an alert that never gets through (or
that the receiver refuses with another 4xx) is counted in :attr:`dead_letters` and logged,
its id and status only. Neither the secret nor the signature is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import Any

import httpx

from keystile.logs import fields

__all__ = ["WebhookSender", "new_secret", "sign"]

logger = logging.getLogger("keystile.alerts")

_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _secret_bytes(secret: str) -> bytes:
    text = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise ValueError("the webhook secret is not base64 (whsec_ + base64)") from None
    if len(key) < 16:
        raise ValueError("the webhook secret is shorter than 16 bytes")
    return key


def new_secret() -> str:
    """A fresh webhook secret: ``whsec_`` + base64 of 32 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value of ``body``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _message_id() -> str:
    return "msg_" + "".join(secrets.choice(_BASE62) for _ in range(24))


class WebhookSender:
    """Signs and delivers JSON payloads to ``url`` (see the module docstring)."""

    def __init__(
        self,
        url: str,
        secret: str | None = None,
        *,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_queue: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._key = _secret_bytes(secret) if secret else None
        if self._key is None:
            logger.warning(
                "alert webhooks go out unsigned: set KEYSTILE_ALERT_WEBHOOK_SECRET so that "
                "the receiver can tell them from forgeries",
                extra=fields("webhook.unsigned"),
            )
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(max_queue)
        self._transport = transport
        self._worker: asyncio.Task[None] | None = None
        self.delivered = 0
        self.retried = 0
        self.dropped = 0  # the queue was full
        self.dead_letters = 0  # never got through, or refused

    def __repr__(self) -> str:
        return f"WebhookSender({self.url!r}, signed={self._key is not None})"

    def send(self, payload: dict[str, Any]) -> None:
        """Queue ``payload`` for delivery (dropped, and counted, when the queue is full)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            self._queue.put_nowait((_message_id(), body))
        except asyncio.QueueFull:
            self.dropped += 1
            logger.warning(
                "alert webhook queue full: an alert was dropped", extra=fields("webhook.dropped")
            )
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._deliver_all(), name="keystile-webhooks"
            )

    def headers(self, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = int(time.time() if now is None else now)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, message_id, timestamp, body)
        return headers

    async def _deliver_all(self) -> None:
        while True:
            async with httpx.AsyncClient(
                timeout=self.timeout, transport=self._transport
            ) as client:
                while not self._queue.empty():
                    message_id, body = self._queue.get_nowait()
                    await self._deliver(client, message_id, body)
            # No await between this test and the end: an alert queued after it finds this
            # task done, and starts another.
            if self._queue.empty():
                return

    async def _deliver(self, client: httpx.AsyncClient, message_id: str, body: bytes) -> None:
        wait = self.backoff
        status: int | str = "no answer"
        for attempt in range(1, self.retries + 1):
            try:
                answer = await client.post(
                    self.url, content=body, headers=self.headers(message_id, body)
                )
                status = answer.status_code
                if answer.is_success:
                    self.delivered += 1
                    return
                if answer.is_client_error and status != 429:
                    break  # refused: trying again would not help
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if attempt < self.retries:
                self.retried += 1
                await asyncio.sleep(wait)
                wait *= 2
        self.dead_letters += 1
        logger.warning(
            "alert webhook %s not delivered (%s)",
            message_id,
            status,
            extra=fields("webhook.dead_letter"),
        )

    async def drain(self) -> None:
        """Deliver what is queued (each try bounded by ``timeout``, retries and waits)."""
        worker = self._worker
        if worker is not None:
            with contextlib.suppress(Exception):
                await worker
