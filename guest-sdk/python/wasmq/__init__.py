"""Write wasmq plugins in Python: the consumer and checker decorators, messages, outcomes and the
host's capabilities (log, kv, publish, context, email, sms, http), over the bindings that
componentize-py generates from wit/wasmq.wit. Mirrors the Rust guest SDK; see README.md.

Natively (plain CPython, for unit tests) the capabilities are the fakes of `wasmq.testing`.
"""

from __future__ import annotations

import json as _json
import sys as _sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from . import template  # noqa: F401  (part of the public API: wasmq.template.render)

__all__ = [
    "Message", "Ack", "Retry", "Reject", "ACK", "COMMIT", "ROLLBACK", "UNKNOWN", "HostError",
    "consumer", "checker", "outcome_of", "once", "log", "kv", "publish", "context", "email",
    "sms", "http", "template",
]

T = TypeVar("T")


# ---- messages and answers ---------------------------------------------------------------------

@dataclass
class Message:
    """One delivered message (`attempt` is 1 on first delivery, then 2, 3, ... on retries)."""

    id: str
    topic: str
    body: bytes
    queue: int = 0
    offset: int = 0
    key: Optional[str] = None
    tag: Optional[str] = None
    sharding_key: Optional[str] = None
    properties: List[Tuple[str, str]] = field(default_factory=list)
    born_at: int = 0
    attempt: int = 1

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError if it is not)."""
        return _json.loads(self.body)

    def text(self) -> Optional[str]:
        """The body as UTF-8 text, or None if it is not."""
        try:
            return bytes(self.body).decode("utf-8")
        except UnicodeDecodeError:
            return None

    def property(self, name: str) -> Optional[str]:
        return next((v for k, v in self.properties if k == name), None)


@dataclass(frozen=True)
class Ack:
    """Done: the offset may move past this message."""


@dataclass(frozen=True)
class Retry:
    """Deliver again after `after_ms` (0: the subscription's backoff decides)."""

    after_ms: int = 0


@dataclass(frozen=True)
class Reject:
    """Never deliver again: to the dead-letter queue, with this reason."""

    reason: str


ACK = Ack()
# A checker's answers for a half message.
COMMIT, ROLLBACK, UNKNOWN = "commit", "rollback", "unknown"


class HostError(Exception):
    """A capability call failed: `kind` is denied, invalid, unavailable or failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def transient(self) -> bool:
        """Only `unavailable` is worth retrying the message for."""
        return self.kind == "unavailable"


# ---- exports ----------------------------------------------------------------------------------

_handlers: dict = {}


def _export(kind: str, fn: Callable) -> Callable:
    _handlers[kind] = fn
    # componentize-py instantiates the app module's `Consumer` / `Checker` class: give the
    # module that defines the handler one that calls it.
    cls = _host.export_class(kind)
    module = _sys.modules.get(fn.__module__)
    if cls is not None and module is not None:
        setattr(module, cls.__name__, cls)
    return fn


def consumer(fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
    """Exports `fn(message) -> Ack | Retry | Reject` as the plugin's `handle`."""
    return _export("handle", fn)


def checker(fn: Callable[[Message], str]) -> Callable[[Message], str]:
    """Exports `fn(message) -> COMMIT | ROLLBACK | UNKNOWN` as `check-transaction`."""
    return _export("check", fn)


def outcome_of(fn: Callable[[], Any]):
    """Runs a side effect: done acks, a transient failure retries, any other failure
    (denied, invalid, refused) dead-letters with the reason."""
    try:
        fn()
    except HostError as e:
        return Retry(0) if e.transient else Reject(f"{e.kind}: {e.message}")
    return ACK


def once(message_id: str, fn: Callable[[], T]) -> bool:
    """Runs `fn` at most once per message id (per plugin), so a retried message does not send a
    second email or SMS. The mark is written only after `fn` succeeds: if it raises, a retry
    runs it again. Returns False when it had already run."""
    mark = f"__once/{message_id}"
    if kv.get(mark) is not None:
        return False
    fn()
    kv.set(mark, b"1")
    return True


# ---- capabilities -----------------------------------------------------------------------------

class log:
    """Lines go to the plugin's log ring in the broker and to its tracing output."""

    @staticmethod
    def log(level: str, message: str) -> None:
        _host.log(level, str(message))

    @staticmethod
    def debug(message: str) -> None:
        _host.log("debug", str(message))

    @staticmethod
    def info(message: str) -> None:
        _host.log("info", str(message))

    @staticmethod
    def warn(message: str) -> None:
        _host.log("warn", str(message))

    @staticmethod
    def error(message: str) -> None:
        _host.log("error", str(message))


class kv:
    """Durable key-value state private to this plugin (shared by its instances)."""

    @staticmethod
    def get(key: str) -> Optional[bytes]:
        return _host.kv_get(key)

    @staticmethod
    def set(key: str, value: bytes) -> None:
        _host.kv_set(key, bytes(value))

    @staticmethod
    def delete(key: str) -> None:
        _host.kv_delete(key)

    @staticmethod
    def list_keys(prefix: str, limit: int = 100) -> List[str]:
        return _host.kv_list_keys(prefix, limit)

    @staticmethod
    def get_json(key: str) -> Any:
        raw = _host.kv_get(key)
        if raw is None:
            return None
        try:
            return _json.loads(raw)
        except ValueError as e:
            raise HostError("invalid", f"kv {key}: {e}") from None

    @staticmethod
    def set_json(key: str, value: Any) -> None:
        _host.kv_set(key, _json.dumps(value).encode())


class publish:
    """Publishing to topics the subscription granted; returns the new message's id once durable."""

    @staticmethod
    def send(topic: str, body: bytes | str, key: Optional[str] = None, tag: Optional[str] = None,
             sharding_key: Optional[str] = None,
             properties: Optional[List[Tuple[str, str]]] = None) -> str:
        data = body.encode() if isinstance(body, str) else bytes(body)
        return _host.publish(topic, data, key, tag, sharding_key, list(properties or []))

    @staticmethod
    def send_json(topic: str, value: Any, **fields) -> str:
        return publish.send(topic, _json.dumps(value).encode(), **fields)


@dataclass
class Identity:
    group: str
    plugin: str
    plugin_version: int
    instance_index: int
    instance_count: int


class context:
    """This instance's identity and its subscription's configuration."""

    @staticmethod
    def identity() -> Identity:
        return _host.identity()

    @staticmethod
    def config_json() -> str:
        return _host.config()

    @staticmethod
    def config() -> Any:
        """The subscription's `config`, parsed (HostError `invalid` if it is not JSON)."""
        try:
            return _json.loads(_host.config())
        except ValueError as e:
            raise HostError("invalid", f"config: {e}") from None


class email:
    """Email through the broker's SMTP relay (needs the `email` grant)."""

    @staticmethod
    def send(to: str, subject: str, text: str, html: Optional[str] = None) -> None:
        _host.email(to, subject, text, html)


class sms:
    """SMS through the broker's gateway (needs the `sms` grant)."""

    @staticmethod
    def send(to: str, text: str) -> None:
        _host.sms(to, text)


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return _json.loads(self.body)


class http:
    """HTTP to allow-listed origins (needs an `http` grant naming the origin)."""

    @staticmethod
    def request(method: str, url: str, headers: Optional[List[Tuple[str, str]]] = None,
                body: bytes | str = b"") -> Response:
        data = body.encode() if isinstance(body, str) else bytes(body)
        return _host.http(method, url, list(headers or []), data)

    @staticmethod
    def get(url: str) -> Response:
        return http.request("GET", url)


# ---- the host, last (it uses the types above): the imports, or the fakes natively --------------

def _component_host():
    try:
        from . import _component
    except ImportError:  # plain CPython: no generated bindings
        from . import testing
        return testing._fake
    return _component


_host = _component_host()
