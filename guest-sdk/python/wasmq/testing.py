"""Native stand-ins for the host, for unit tests of plugin logic under plain CPython: in-memory
kv, captured logs, published messages, emails and SMS, a settable config and identity, and a
way to make the next capability call fail."""

import json
from typing import Any, Optional

import wasmq


class _Fake:
    def __init__(self):
        self.kv = {}
        self.logs = []
        self.published = []
        self.emails = []
        self.sms_sent = []
        self.requests = []
        self._config = "{}"
        self._identity = wasmq.Identity("test", "test", 1, 0, 1)
        self.failure: Optional[wasmq.HostError] = None
        self.response = wasmq.Response(200, [], b"")

    def _effect(self):
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    # The host interface wasmq calls (the same names as wasmq._component).
    def log(self, level, message):
        self.logs.append((level, message))

    def kv_get(self, key):
        return self.kv.get(key)

    def kv_set(self, key, value):
        self.kv[key] = bytes(value)

    def kv_delete(self, key):
        self.kv.pop(key, None)

    def kv_list_keys(self, prefix, limit):
        return sorted(k for k in self.kv if k.startswith(prefix))[:limit]

    def publish(self, topic, body, key, tag, sharding_key, properties):
        self._effect()
        self.published.append({"topic": topic, "body": body, "key": key, "tag": tag,
                               "sharding_key": sharding_key, "properties": properties})
        return f"00000000-0000-7000-8000-{len(self.published):012d}"

    def identity(self):
        return self._identity

    def config(self):
        return self._config

    def email(self, to, subject, text, html):
        self._effect()
        self.emails.append((to, subject, text, html))

    def sms(self, to, text):
        self._effect()
        self.sms_sent.append((to, text))

    def http(self, method, url, headers, body):
        self._effect()
        self.requests.append((method, url, headers, body))
        return self.response

    def export_class(self, kind):
        return None


_fake = _Fake()


def reset() -> None:
    """Forgets all fake state."""
    _fake.__init__()


def set_config(config: Any) -> None:
    """The subscription config the plugin sees: a dict (encoded as JSON) or JSON text."""
    _fake._config = config if isinstance(config, str) else json.dumps(config)


def set_identity(instance_index: int = 0, instance_count: int = 1, group: str = "test") -> None:
    _fake._identity = wasmq.Identity(group, "test", 1, instance_index, instance_count)


def fail_next(kind: str, message: str = "test failure") -> None:
    """The next side effect (email, sms, publish, http) fails with HostError(kind, message)."""
    _fake.failure = wasmq.HostError(kind, message)


def message(body: Any, **fields) -> "wasmq.Message":
    """A message with this body (dicts and lists become JSON) and plausible other fields."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else bytes(body)
    fields.setdefault("id", "00000000-0000-7000-8000-000000000001")
    fields.setdefault("topic", "test")
    return wasmq.Message(body=data, **fields)


def emails():
    """(to, subject, text, html) of each email sent."""
    return list(_fake.emails)


def sms():
    """(to, text) of each SMS sent."""
    return list(_fake.sms_sent)


def published():
    return list(_fake.published)


def logs():
    return list(_fake.logs)


def kv():
    return dict(_fake.kv)
