"""The component side of the SDK: calls the broker through the bindings componentize-py generates
(importable only inside a component build) and converts between them and the SDK's types."""

import traceback

from componentize_py_types import Err
from wit_world.imports import context as _context
from wit_world.imports import email as _email
from wit_world.imports import http as _http
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import publish as _publish
from wit_world.imports import sms as _sms
from wit_world.imports import types as _types

import wasmq

_LEVELS = {
    "trace": _log.Level.TRACE, "debug": _log.Level.DEBUG, "info": _log.Level.INFO,
    "warn": _log.Level.WARN, "error": _log.Level.ERROR,
}


def _call(fn, *args):
    """Calls an import; its `error` variant becomes a wasmq.HostError."""
    try:
        return fn(*args)
    except Err as e:
        # Error_Denied -> "denied", ...
        kind = type(e.value).__name__.split("_", 1)[-1].lower()
        raise wasmq.HostError(kind, str(e.value.value)) from None


def log(level, message):
    _log.log(_LEVELS.get(level, _log.Level.INFO), message)


def kv_get(key):
    return _call(_kv.get, key)


def kv_set(key, value):
    _call(_kv.set, key, value)


def kv_delete(key):
    _call(_kv.delete, key)


def kv_list_keys(prefix, limit):
    return _call(_kv.list_keys, prefix, limit)


def publish(topic, body, key, tag, sharding_key, properties):
    out = _publish.Outgoing(topic=topic, body=body, key=key, tag=tag, sharding_key=sharding_key,
                            properties=properties)
    return _call(_publish.send, out)


def identity():
    i = _context.identity()
    return wasmq.Identity(i.group, i.plugin, i.plugin_version, i.instance_index, i.instance_count)


def config():
    return _context.config()


def email(to, subject, text, html):
    _call(_email.send, to, subject, text, html)


def sms(to, text):
    _call(_sms.send, to, text)


def http(method, url, headers, body):
    r = _call(_http.send, _http.Request(method=method, url=url, headers=headers, body=body))
    return wasmq.Response(r.status, r.headers, r.body)


# The binding's record has wasmq.Message's fields under the same names: adopting its attributes
# in one C call costs less per message than the dataclass's __init__ (11 keyword arguments, 11
# attribute stores run by the interpreter). Should the two ever differ, the fields are copied.
_SAME_FIELDS = getattr(_types.Message, "__dataclass_fields__", {}).keys() == \
    wasmq.Message.__dataclass_fields__.keys()


def _message(raw):
    if _SAME_FIELDS:
        message = object.__new__(wasmq.Message)
        message.__dict__.update(raw.__dict__)
        return message
    return wasmq.Message(id=raw.id, topic=raw.topic, body=raw.body, queue=raw.queue,
                         offset=raw.offset, key=raw.key, tag=raw.tag,
                         sharding_key=raw.sharding_key, properties=raw.properties,
                         born_at=raw.born_at, attempt=raw.attempt)


def _run(kind, raw):
    fn = wasmq._handlers.get(kind)
    if fn is None:
        raise RuntimeError(f"no @wasmq.{'consumer' if kind == 'handle' else 'checker'} handler")
    try:
        return fn(_message(raw))
    except BaseException:
        # Like a Rust panic, an uncaught exception traps (the subscription's retry policy
        # applies); the traceback goes to the plugin's log first, where its author can see it.
        _log.log(_log.Level.ERROR, traceback.format_exc(limit=20))
        raise


_ACK = _types.Outcome_Ack()


def _outcome(out):
    if isinstance(out, wasmq.Ack):
        return _ACK
    if isinstance(out, wasmq.Retry):
        return _types.Outcome_Retry(max(0, int(out.after_ms)))
    if isinstance(out, wasmq.Reject):
        return _types.Outcome_Reject(str(out.reason))
    raise TypeError(f"a consumer returns wasmq.ACK, Retry(ms) or Reject(reason), not {out!r}")


_CHECKS = {
    wasmq.COMMIT: _types.CheckResult.COMMIT,
    wasmq.ROLLBACK: _types.CheckResult.ROLLBACK,
    wasmq.UNKNOWN: _types.CheckResult.UNKNOWN,
}


class Consumer:
    def handle(self, message):
        return _outcome(_run("handle", message))


class Checker:
    def check_transaction(self, message):
        answer = _run("check", message)
        if answer not in _CHECKS:
            raise TypeError(f"a checker returns wasmq.COMMIT, ROLLBACK or UNKNOWN, not {answer!r}")
        return _CHECKS[answer]


def export_class(kind):
    return Consumer if kind == "handle" else Checker
