"""A producer client for wasmq's HTTP API (standard library only).

Publish one message or a batch, with an idempotency key; transactional half messages (begin,
commit, rollback); retries on 429 and 503 that honour ``Retry-After``; typed errors.

    from wasmq_client import Client
    client = Client("http://127.0.0.1:7700")
    sent = client.publish("orders", {"order": 7}, key="order-7")
    print(sent.id, sent.queue, sent.offset)

Retries: an answer 429 (``backlog_full``) or a 503 of an admission check (``disk_full``,
``too_many_connections``, ``too_many_streams``, ``compile_busy``) means nothing was done, so the
request is sent again after the server's ``Retry-After`` (at most ``max_wait`` seconds per
wait), up to ``max_attempts`` sends in all. A connection that could not be made is retried too.
After anything that may have followed a write (a reset, a timeout, ``storage_unavailable``,
another 5xx) a request is repeated only when a repeat cannot store twice: a publish with an
idempotency key, a commit, a rollback.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = [
    "Client",
    "Message",
    "Published",
    "Transaction",
    "WasmqError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "Unprocessable",
    "Overloaded",
    "ServerError",
    "TransportError",
]


class WasmqError(Exception):
    """An error answer: ``status`` (HTTP), ``code`` (stable, e.g. ``unknown_topic``), ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequest(WasmqError):
    """400: the request is malformed (bad JSON, a field out of bounds)."""


class Unauthorized(WasmqError):
    """401: no valid token."""


class Forbidden(WasmqError):
    """403: the token lacks the route's scope or the topic."""


class NotFound(WasmqError):
    """404: no such topic, message or transaction."""


class Conflict(WasmqError):
    """409: e.g. committing a rolled-back transaction."""


class PayloadTooLarge(WasmqError):
    """413: a body or batch over the server's limits."""


class Unprocessable(WasmqError):
    """422: e.g. an idempotency key reused with another message."""


class Overloaded(WasmqError):
    """429 or 503: refused for now (already retried ``max_attempts`` times when nothing was done)."""


_REFUSED_BEFORE_WRITING = {"disk_full", "too_many_connections", "too_many_streams", "compile_busy"}


def refused_before_writing(status: int, code: str) -> bool:
    """429, or a 503 of an admission check: the server did nothing, a repeat is safe."""
    return status == 429 or (status == 503 and code in _REFUSED_BEFORE_WRITING)


class ServerError(WasmqError):
    """Any other 5xx."""


class TransportError(Exception):
    """No answer: the server could not be reached, or the connection broke."""


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: Overloaded,
    503: Overloaded,
}


def _error(status: int, body: bytes, retry_after: Optional[float]) -> WasmqError:
    try:
        inner = json.loads(body)["error"]
        code, message = str(inner["code"]), str(inner["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", body[:500].decode("utf-8", "replace")
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else WasmqError)
    return cls(status, code, message, retry_after)


@dataclass(frozen=True)
class Published:
    """Where a message was stored; ``replayed`` when an idempotency key matched an earlier one."""

    id: str
    queue: int
    offset: int
    replayed: bool = False


@dataclass(frozen=True)
class Transaction:
    """A transaction begun with a half message, invisible until committed."""

    txn_id: str
    message_id: str
    check_after_ms: int


class Message:
    """One message: a JSON body (``body``) or bytes (``data``), and optional envelope fields."""

    def __init__(
        self,
        body: Any = None,
        *,
        data: Optional[bytes] = None,
        key: Optional[str] = None,
        tag: Optional[str] = None,
        sharding_key: Optional[str] = None,
        properties: Optional[Mapping[str, str]] = None,
        delay_ms: Optional[int] = None,
        deliver_at: Optional[int] = None,
    ):
        envelope: dict = {}
        if data is not None:
            if body is not None:
                raise ValueError("give a JSON body or data (bytes), not both")
            envelope["body_base64"] = base64.b64encode(bytes(data)).decode("ascii")
        else:
            envelope["body"] = body
        for name, value in (
            ("key", key),
            ("tag", tag),
            ("sharding_key", sharding_key),
            ("delay_ms", delay_ms),
            ("deliver_at", deliver_at),
        ):
            if value is not None:
                envelope[name] = value
        if properties:
            envelope["properties"] = dict(properties)
        self.envelope = envelope


class Client:
    """A client for one wasmq server (``http://127.0.0.1:7700``); ``token`` is a bearer token."""

    def __init__(
        self,
        base_url: str,
        *,
        token: Optional[str] = None,
        timeout: float = 60.0,
        max_attempts: int = 5,
        max_wait: float = 30.0,
        backoff: float = 0.1,
        on_retry: Optional[Callable[[Exception, int], None]] = None,
    ):
        """``on_retry(error, attempt)`` is called before each wait for a retry (for logging)."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{base_url!r} is not an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.max_wait = max_wait
        self.backoff = backoff
        self.on_retry = on_retry

    def publish(
        self,
        topic: str,
        body: Any = None,
        *,
        idempotency_key: Optional[str] = None,
        **fields: Any,
    ) -> Published:
        """Publishes one message: ``body`` (JSON) or ``data=b"..."``, plus ``key``, ``tag``,
        ``sharding_key``, ``properties``, ``delay_ms`` or ``deliver_at``; or a ``Message``."""
        message = body if isinstance(body, Message) else Message(body, **fields)
        if idempotency_key is not None and not idempotency_key:
            raise ValueError("an idempotency key is not empty")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        status, answer_headers, answer = self._send(
            "POST",
            f"/v1/topics/{_seg(topic)}/messages",
            message.envelope,
            headers,
            safe=idempotency_key is not None,
        )
        replayed = answer_headers.get("idempotent-replayed") == "true"
        return Published(answer["id"], answer["queue"], answer["offset"], replayed)

    def publish_batch(self, topic: str, messages: Sequence[Any]) -> list:
        """Publishes messages atomically (all stored or none); each a ``Message`` or a JSON body."""
        envelopes = [m.envelope if isinstance(m, Message) else Message(m).envelope for m in messages]
        _, _, answer = self._send(
            "POST", f"/v1/topics/{_seg(topic)}/messages/batch", {"messages": envelopes}, {}, safe=False
        )
        return [Published(r["id"], r["queue"], r["offset"]) for r in answer["results"]]

    def begin(self, topic: str, body: Any = None, *, check_after_ms: Optional[int] = None, **fields: Any) -> Transaction:
        """Begins a transaction with a half message (same fields as ``publish``)."""
        message = body if isinstance(body, Message) else Message(body, **fields)
        envelope = dict(message.envelope)
        if check_after_ms is not None:
            envelope["check_after_ms"] = check_after_ms
        _, _, answer = self._send(
            "POST", f"/v1/topics/{_seg(topic)}/transactions", envelope, {}, safe=False
        )
        return Transaction(answer["txn_id"], answer["message_id"], answer["check_after_ms"])

    def commit(self, txn_id: str) -> str:
        """Commits (idempotent); returns the state. A rolled-back transaction raises Conflict."""
        return self._send("POST", f"/v1/transactions/{_seg(txn_id)}/commit", None, {}, safe=True)[2]["state"]

    def rollback(self, txn_id: str) -> str:
        """Rolls back (idempotent); returns the state. A committed transaction raises Conflict."""
        return self._send("POST", f"/v1/transactions/{_seg(txn_id)}/rollback", None, {}, safe=True)[2]["state"]

    def _send(self, method: str, path: str, body: Any, headers: Mapping[str, str], *, safe: bool):
        data = None if body is None else json.dumps(body).encode("utf-8")
        all_headers = dict(headers)
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        backoff = self.backoff
        attempt = 1
        while True:
            request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=all_headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
                    answer_headers = {k.lower(): v for k, v in resp.headers.items()}
                    return resp.status, answer_headers, json.loads(raw) if raw else {}
            except urllib.error.HTTPError as e:
                raw = e.read()
                retry_after = _retry_after(e.headers.get("Retry-After"))
                api_error = _error(e.code, raw, retry_after)
                error: Exception = api_error
                again = refused_before_writing(e.code, api_error.code) or (e.code >= 500 and safe)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                refused = isinstance(reason, ConnectionRefusedError)
                error = TransportError(f"cannot reach wasmq at {self.base_url}: {reason}")
                retry_after = None
                again = refused or safe
            if not again or attempt >= self.max_attempts:
                raise error
            wait = retry_after if retry_after is not None else backoff
            if self.on_retry is not None:
                self.on_retry(error, attempt)
            time.sleep(min(wait, self.max_wait))
            backoff = min(backoff * 2, self.max_wait)
            attempt += 1


def _seg(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(int(value.strip()))) if value else None
    except ValueError:
        return None
