"""Alert webhooks signed as the Standard Webhooks specification says, verified by its own
package as a receiver would; queued, retried, counted (issue #17, item 5)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from keystile import ManualClock
from keystile.webhooks import WebhookSender, new_secret
from test_alerts import Receiver, inactive_alert, receiver_for  # noqa: F401 - a fixture

SECRET = new_secret()


async def test_an_alert_arrives_signed_and_verifies_with_the_standard_package(
    receiver_for: Callable[..., Receiver],  # noqa: F811
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYSTILE_ALERT_WEBHOOK_SECRET", SECRET)
    receiver = receiver_for()
    rig, key_id = await inactive_alert(receiver.url, clock)
    assert await rig.flush() == ["inactive_key_in_use"]
    await rig.gate.alerts.drain()
    [(body, headers)] = receiver.raw
    alert = Webhook(SECRET).verify(body, headers)
    assert (alert["rule"], alert["key_id"]) == ("inactive_key_in_use", key_id)
    assert headers["webhook-id"].startswith("msg_") and len(headers["webhook-id"]) == 28
    assert headers["webhook-signature"].startswith("v1,")
    # Another secret, or a body changed on the way, does not verify.
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"inactive", b"INACTIVE"), headers)
    assert SECRET.removeprefix("whsec_") not in json.dumps(receiver.raw[0][1])
    await rig.close()


async def test_retries_keep_the_message_id_and_every_try_verifies(
    receiver_for: Callable[..., Receiver],  # noqa: F811
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYSTILE_ALERT_WEBHOOK_SECRET", SECRET)
    receiver = receiver_for([503, 429])
    rig, _ = await inactive_alert(receiver.url, clock)
    assert await rig.flush() == ["inactive_key_in_use"]
    await asyncio.wait_for(rig.gate.alerts.drain(), 10)
    assert len(receiver.raw) == 3
    assert len({headers["webhook-id"] for _, headers in receiver.raw}) == 1
    for body, headers in receiver.raw:
        Webhook(SECRET).verify(body, headers)
    sender = rig.gate.alerts.webhook
    assert sender is not None
    assert (sender.delivered, sender.retried, sender.dead_letters) == (1, 2, 0)
    await rig.close()


async def test_a_refusing_receiver_is_a_dead_letter_after_one_try(
    receiver_for: Callable[..., Receiver],  # noqa: F811
) -> None:
    receiver = receiver_for([400, 500, 500, 500])
    sender = WebhookSender(receiver.url, SECRET, retries=3, backoff=0.01)
    sender.send({"n": 1})  # 400: refused, not retried
    await sender.drain()
    sender.send({"n": 2})  # 500 three times: given up
    await sender.drain()
    assert [json.loads(body)["n"] for body, _ in receiver.raw] == [1, 2, 2, 2]
    assert (sender.delivered, sender.dead_letters, sender.retried) == (0, 2, 2)


async def test_the_queue_is_bounded_and_counts_what_it_drops(
    receiver_for: Callable[..., Receiver],  # noqa: F811
) -> None:
    receiver = receiver_for()
    sender = WebhookSender(receiver.url, SECRET, max_queue=3)
    for n in range(5):  # queued within one step of the loop: the worker has not run yet
        sender.send({"n": n})
    await sender.drain()
    assert [json.loads(body)["n"] for body, _ in receiver.raw] == [0, 1, 2]
    assert (sender.delivered, sender.dropped) == (3, 2)
    sender.send({"n": 5})  # after a drain, a new worker delivers
    await sender.drain()
    assert sender.delivered == 4


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("whsec_not base64!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "shorter than 16 bytes"),
    ],
)
def test_a_malformed_secret_is_refused_with_its_reason(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        WebhookSender("http://127.0.0.1:9/x", secret)
    assert secret.removeprefix("whsec_") not in str(caught.value)


def test_the_sender_never_shows_its_secret() -> None:
    sender = WebhookSender("http://127.0.0.1:9/x", SECRET)
    assert SECRET not in repr(sender) and SECRET.removeprefix("whsec_") not in repr(sender)


def test_the_readme_receiver_verifies_what_the_sender_signs() -> None:
    from test_readme import BLOCKS

    block = next(b for b in BLOCKS if "def verified_alert" in b)
    namespace: dict[str, object] = {}
    exec(block, namespace)
    verified_alert = namespace["verified_alert"]
    assert callable(verified_alert)
    sender = WebhookSender("http://127.0.0.1:9/x", SECRET)
    body = b'{"rule":"new_ip","key_id":"key_1"}'
    headers = sender.headers("msg_" + "a" * 24, body)
    assert verified_alert(body, headers, SECRET) == {"rule": "new_ip", "key_id": "key_1"}
    with pytest.raises(WebhookVerificationError):
        verified_alert(body, {**headers, "webhook-id": "msg_" + "b" * 24}, SECRET)
