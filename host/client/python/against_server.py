"""Exercises wasmq_client against a real server (run by tests/tests/clients.rs, which sets
WASMQ_URL and makes the topics `py-orders`, `py-txn` and `py-slow`, the last with a subscription
`py-slow` that consumes one message per ~17 minutes while the server's max_backlog is 2)."""

import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wasmq_client import (  # noqa: E402
    BadRequest,
    Client,
    Conflict,
    Message,
    NotFound,
    Overloaded,
    TransportError,
    Unprocessable,
)

url = os.environ["WASMQ_URL"]
client = Client(url)


def get(path):
    with urllib.request.urlopen(url + path) as r:
        return json.loads(r.read())


def raises(cls, fn, code=None):
    try:
        fn()
    except cls as e:
        assert code is None or e.code == code, (e.code, code)
        return e
    raise AssertionError(f"expected {cls.__name__}")


# Publish: JSON, bytes, envelope fields; read back through the API.
a = client.publish("py-orders", {"order": 1}, key="o-1", tag="created", sharding_key="u-1", properties={"via": "py"})
m = get(f"/v1/messages/{a.id}")
assert m["body"] == {"order": 1} and m["key"] == "o-1" and m["tag"] == "created", m
assert m["properties"] == {"via": "py"} and m["sharding_key"] == "u-1", m
b = client.publish("py-orders", data=b"\x00\xff\x10")
assert get(f"/v1/messages/{b.id}")["body_base64"] == "AP8Q"
# An idempotency key: the repeat stores nothing and says so; another message under it is refused.
first = client.publish("py-orders", {"order": 2}, idempotency_key="py-k")
again = client.publish("py-orders", {"order": 2}, idempotency_key="py-k")
assert (again.id, again.replayed, first.replayed) == (first.id, True, False), (first, again)
raises(Unprocessable, lambda: client.publish("py-orders", {"order": 3}, idempotency_key="py-k"), "idempotency_key_reused")
# A batch, atomically.
batch = client.publish_batch("py-orders", [{"n": 1}, Message({"n": 2}, key="b-2")])
assert len(batch) == 2 and batch[1].offset >= 0
# Typed errors.
raises(NotFound, lambda: client.publish("py-nope", {"x": 1}), "unknown_topic")
raises(BadRequest, lambda: client.publish("py-orders", {"x": 1}, tag="a|b"))
raises(TransportError, lambda: Client("http://127.0.0.1:1", max_attempts=2, backoff=0.01).publish("t", 1))
raises(ValueError, lambda: client.publish("py-orders", 1, idempotency_key=""))
# Transactions: begin, commit (twice: idempotent), rollback of another; the opposite decision is a 409.
t = client.begin("py-txn", {"order": 9}, check_after_ms=60000)
assert client.commit(t.txn_id) == "committed"
assert client.commit(t.txn_id) == "committed"
assert get(f"/v1/messages/{t.message_id}")["body"] == {"order": 9}
r = client.begin("py-txn", {"order": 10})
assert client.rollback(r.txn_id) == "rolled_back"
raises(Conflict, lambda: client.commit(r.txn_id))
# 429: refused while the slow subscription is behind; the retry after Retry-After succeeds once
# on_retry (the first refusal) has deleted that subscription.
for _ in range(100):
    try:
        Client(url, max_attempts=1).publish("py-slow", {"fill": True})
    except Overloaded as e:
        assert e.status == 429 and e.code == "backlog_full" and e.retry_after == 1.0, e
        break
else:
    raise AssertionError("max_backlog 2 never pushed back in 100 publishes")
raises(Overloaded, lambda: Client(url, max_attempts=2, max_wait=0.05).publish("py-slow", {"x": 1}), "backlog_full")
seen = []


def unblock(error, attempt):
    seen.append((getattr(error, "status", None), attempt))
    if len(seen) == 1:
        req = urllib.request.Request(url + "/v1/subscriptions/py-slow", method="DELETE")
        urllib.request.urlopen(req).read()


late = Client(url, max_attempts=30, max_wait=1.0, on_retry=unblock).publish("py-slow", {"late": True})
assert seen and seen[0] == (429, 1), seen
assert get(f"/v1/messages/{late.id}")["body"] == {"late": True}
print(f"python client: ok ({len(seen)} retries)")
