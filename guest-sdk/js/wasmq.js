// Write wasmq plugins in JavaScript: consumer and checker exports, messages, outcomes and the
// host's capabilities (log, kv, publish, context, email, sms, http), over the imports that
// componentize-js binds from wit/wasmq.wit. Mirrors the Rust and Python SDKs; see README.md.

import { logUtf8 as hostLogUtf8 } from 'wasmq:plugin/log@0.1.0';
import * as hostKv from 'wasmq:plugin/kv@0.1.0';
import { send as hostPublish } from 'wasmq:plugin/publish@0.1.0';
import { identity as hostIdentity, config as hostConfig } from 'wasmq:plugin/context@0.1.0';
import { send as hostEmail } from 'wasmq:plugin/email@0.1.0';
import { send as hostSms } from 'wasmq:plugin/sms@0.1.0';
import { send as hostHttp } from 'wasmq:plugin/http@0.1.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** A capability call failed: `kind` is denied, invalid, unavailable or failed. */
export class HostError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.kind = kind;
    this.detail = message;
  }
  /** Only `unavailable` is worth retrying the message for. */
  get transient() {
    return this.kind === 'unavailable';
  }
}

// Calls an import; its `error` variant (thrown with a `payload`) becomes a HostError.
function call(fn, ...args) {
  try {
    return fn(...args);
  } catch (e) {
    if (e && e.payload && typeof e.payload.tag === 'string') {
      throw new HostError(e.payload.tag, String(e.payload.val));
    }
    throw e;
  }
}

// A line crosses to the host as UTF-8 bytes (`log-utf8`): the bindings lower a string through
// an interpreted loop over its code units, ~0.6 µs each (a 300-character line cost 180 µs, most
// of a message's cost), where TextEncoder and a byte list's copy are native.
const hostLog = (level, message) => hostLogUtf8(level, encoder.encode(String(message)));

const bytes = (body) => (typeof body === 'string' ? encoder.encode(body) : new Uint8Array(body));

/** One delivered message (`attempt` is 1 on first delivery, then 2, 3, ... on retries). */
export class Message {
  constructor(raw) {
    this.id = raw.id;
    this.topic = raw.topic;
    this.queue = raw.queue;
    this.offset = Number(raw.offset);
    this.key = raw.key ?? null;
    this.tag = raw.tag ?? null;
    this.shardingKey = raw.shardingKey ?? null;
    this.properties = raw.properties ?? [];
    this.body = raw.body;
    this.bornAt = Number(raw.bornAt);
    this.attempt = raw.attempt;
  }
  /** The body parsed as JSON (throws SyntaxError if it is not). */
  json() {
    return JSON.parse(decoder.decode(this.body));
  }
  /** The body as UTF-8 text, or null if it is not. */
  text() {
    try {
      return decoder.decode(this.body);
    } catch {
      return null;
    }
  }
  property(name) {
    const found = this.properties.find(([k]) => k === name);
    return found ? found[1] : null;
  }
}

/** Done: the offset may move past this message. */
export const ACK = Object.freeze({ tag: 'ack' });
/** Deliver again after `afterMs` (0: the subscription's backoff decides). */
export const retry = (afterMs = 0) => ({ tag: 'retry', val: BigInt(Math.max(0, Math.floor(afterMs))) });
/** Never deliver again: to the dead-letter queue, with this reason. */
export const reject = (reason) => ({ tag: 'reject', val: String(reason) });
/** A checker's answers for a half message. */
export const COMMIT = 'commit';
export const ROLLBACK = 'rollback';
export const UNKNOWN = 'unknown';

// An uncaught exception traps, like a Rust panic (the subscription's retry policy applies); its
// stack goes to the plugin's log first, where its author can see it.
function guarded(fn, raw) {
  try {
    return fn(new Message(raw));
  } catch (e) {
    hostLog('error', `uncaught: ${e && e.stack ? e.stack : e}`);
    throw e;
  }
}

const OUTCOMES = new Set(['ack', 'retry', 'reject']);
const CHECKS = new Set([COMMIT, ROLLBACK, UNKNOWN]);

/** The `consumer` export for `fn(message) -> ACK | retry(ms) | reject(reason)`:
 *  `export const consumer = wasmq.consumer((message) => ...)`. */
export function consumer(fn) {
  return {
    handle(raw) {
      const out = guarded(fn, raw);
      if (!out || !OUTCOMES.has(out.tag)) {
        throw new TypeError(`a consumer returns ACK, retry(ms) or reject(reason), not ${JSON.stringify(out)}`);
      }
      return out;
    },
  };
}

/** The `checker` export for `fn(message) -> COMMIT | ROLLBACK | UNKNOWN`. */
export function checker(fn) {
  return {
    checkTransaction(raw) {
      const out = guarded(fn, raw);
      if (!CHECKS.has(out)) {
        throw new TypeError(`a checker returns COMMIT, ROLLBACK or UNKNOWN, not ${JSON.stringify(out)}`);
      }
      return out;
    },
  };
}

/** Runs a side effect: done acks, a transient failure retries, any other failure (denied,
 *  invalid, refused) dead-letters with the reason. */
export function outcomeOf(fn) {
  try {
    fn();
  } catch (e) {
    if (!(e instanceof HostError)) throw e;
    return e.transient ? retry(0) : reject(`${e.kind}: ${e.detail}`);
  }
  return ACK;
}

/** Runs `fn` at most once per message id (per plugin), so a retried message does not repeat a
 *  side effect. The mark is written only after `fn` succeeds. False when it had already run. */
export function once(messageId, fn) {
  const mark = `__once/${messageId}`;
  if (kv.get(mark) !== undefined) return false;
  fn();
  kv.set(mark, '1');
  return true;
}

/** Lines go to the plugin's log ring in the broker and to its tracing output. */
export const log = {
  log: (level, message) => hostLog(level, message),
  debug: (message) => hostLog('debug', message),
  info: (message) => hostLog('info', message),
  warn: (message) => hostLog('warn', message),
  error: (message) => hostLog('error', message),
};

/** Durable key-value state private to this plugin (shared by its instances). */
export const kv = {
  /** The value's bytes, or undefined. */
  get: (key) => call(hostKv.get, key),
  set: (key, value) => call(hostKv.set, key, bytes(value)),
  delete: (key) => call(hostKv.delete, key),
  listKeys: (prefix, limit = 100) => call(hostKv.listKeys, prefix, limit),
  getJson(key) {
    const raw = kv.get(key);
    if (raw === undefined) return undefined;
    try {
      return JSON.parse(decoder.decode(raw));
    } catch (e) {
      throw new HostError('invalid', `kv ${key}: ${e.message}`);
    }
  },
  setJson: (key, value) => kv.set(key, JSON.stringify(value)),
};

/** Publishing to topics the subscription granted; returns the new message's id once durable. */
export const publish = {
  send: (topic, body, { key, tag, shardingKey, properties } = {}) =>
    call(hostPublish, { topic, body: bytes(body), key, tag, shardingKey, properties: properties ?? [] }),
  sendJson: (topic, value, fields = {}) => publish.send(topic, JSON.stringify(value), fields),
};

/** This instance's identity and its subscription's configuration. */
export const context = {
  /** { group, plugin, pluginVersion, instanceIndex, instanceCount } */
  identity: () => hostIdentity(),
  configJson: () => hostConfig(),
  config() {
    try {
      return JSON.parse(hostConfig());
    } catch (e) {
      throw new HostError('invalid', `config: ${e.message}`);
    }
  },
};

/** Email through the broker's SMTP relay (needs the `email` grant). */
export const email = {
  send: (to, subject, text, html) => call(hostEmail, to, subject, text, html ?? undefined),
};

/** SMS through the broker's gateway (needs the `sms` grant). */
export const sms = {
  send: (to, text) => call(hostSms, to, text),
};

/** HTTP to allow-listed origins (needs an `http` grant naming the origin). */
export const http = {
  request(method, url, { headers = [], body = '' } = {}) {
    const r = call(hostHttp, { method, url, headers, body: bytes(body) });
    return { status: r.status, headers: r.headers, body: r.body, json: () => JSON.parse(decoder.decode(r.body)) };
  },
  get: (url) => http.request('GET', url),
};
