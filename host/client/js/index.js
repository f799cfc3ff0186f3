// A producer client for wasmq's HTTP API (Node 18+; only fetch).
//
// Publish one message or a batch, with an idempotency key; transactional half messages (begin,
// commit, rollback); retries on 429 and 503 that honour Retry-After; typed errors.
//
//   import { Client } from "wasmq-client";
//   const client = new Client("http://127.0.0.1:7700");
//   const sent = await client.publish("orders", { body: { order: 7 }, key: "order-7" });
//
// Retries: an answer 429 (backlog_full) or a 503 of an admission check (disk_full,
// too_many_connections, too_many_streams, compile_busy) means nothing was done, so the request
// is sent again after the server's Retry-After (at most maxWaitMs per wait), up to maxAttempts
// sends in all. A connection that could not be made is retried too. After anything that may
// have followed a write (a reset, storage_unavailable, another 5xx) a request is repeated only
// when a repeat cannot store twice: a publish with an idempotency key, a commit, a rollback.
// In a browser only same-origin: the server answers no CORS preflight.

/** An error answer: status (HTTP), code (stable, e.g. "unknown_topic"), message. */
export class WasmqError extends Error {
  constructor(status, code, message, retryAfterMs) {
    super(`${status} ${code}: ${message}`);
    this.name = "WasmqError";
    this.status = status;
    this.code = code;
    this.detail = message;
    this.retryAfterMs = retryAfterMs;
  }
  /** Refused for now before anything was done (already retried maxAttempts times). */
  get overloaded() {
    return refusedBeforeWriting(this.status, this.code);
  }
}

const ADMISSION = new Set(["disk_full", "too_many_connections", "too_many_streams", "compile_busy"]);

/** 429, or a 503 of an admission check: the server did nothing, a repeat is safe. */
export function refusedBeforeWriting(status, code) {
  return status === 429 || (status === 503 && ADMISSION.has(code));
}

const count = (value, fallback, name) => {
  const n = value ?? fallback;
  if (!Number.isFinite(n) || n < 0) throw new TypeError(`${name} must be a finite number >= 0`);
  return n;
};

/** No answer: the server could not be reached, or the connection broke. */
export class TransportError extends Error {
  constructor(message, cause) {
    super(message, { cause });
    this.name = "TransportError";
  }
}

const FIELDS = ["key", "tag", "sharding_key", "properties", "delay_ms", "deliver_at"];

/**
 * The envelope of one message: `{ body }` (any JSON) or `{ data }` (a Uint8Array or Buffer,
 * sent base64-encoded), plus key, tag, sharding_key, properties, delay_ms or deliver_at.
 */
export function envelope(message) {
  if (message === null || typeof message !== "object") {
    throw new TypeError("a message is an object: { body } or { data }, and optional fields");
  }
  const out = {};
  if (message.data !== undefined) {
    if (message.body !== undefined) throw new TypeError("give body (JSON) or data (bytes), not both");
    out.body_base64 = base64(message.data);
  } else if (message.body !== undefined) {
    out.body = message.body;
  } else {
    throw new TypeError("a message needs body (JSON) or data (bytes)");
  }
  for (const f of FIELDS) if (message[f] !== undefined) out[f] = message[f];
  return out;
}

function base64(bytes) {
  const view = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (typeof Buffer !== "undefined") return Buffer.from(view).toString("base64");
  let s = "";
  for (const b of view) s += String.fromCharCode(b);
  return btoa(s);
}

const seg = (name) => encodeURIComponent(name);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class Client {
  /**
   * @param {string} baseUrl e.g. "http://127.0.0.1:7700"
   * @param {{token?: string, maxAttempts?: number, maxWaitMs?: number, backoffMs?: number,
   *   onRetry?: (error: Error, attempt: number) => void}} [options] onRetry is called before each
   *   wait for a retry (for logging)
   */
  constructor(baseUrl, options = {}) {
    if (!/^https?:\/\//.test(baseUrl)) throw new TypeError(`${JSON.stringify(baseUrl)} is not an http:// or https:// URL`);
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.token = options.token;
    this.maxAttempts = Math.max(1, count(options.maxAttempts, 5, "maxAttempts"));
    this.maxWaitMs = count(options.maxWaitMs, 30_000, "maxWaitMs");
    this.backoffMs = count(options.backoffMs, 100, "backoffMs");
    this.onRetry = options.onRetry;
  }

  /** Publishes one message; `idempotencyKey` makes a repeat store nothing (result.replayed). */
  async publish(topic, message, { idempotencyKey } = {}) {
    const keyed = idempotencyKey !== undefined && idempotencyKey !== null;
    if (keyed && (typeof idempotencyKey !== "string" || idempotencyKey === "")) {
      throw new TypeError("an idempotency key is a non-empty string");
    }
    const headers = keyed ? { "idempotency-key": idempotencyKey } : {};
    const { headers: answerHeaders, body } = await this.#send(
      "POST", `/v1/topics/${seg(topic)}/messages`, envelope(message), headers, keyed);
    return { id: body.id, queue: body.queue, offset: body.offset, replayed: answerHeaders.get("idempotent-replayed") === "true" };
  }

  /** Publishes messages atomically: all stored or none. */
  async publishBatch(topic, messages) {
    const { body } = await this.#send(
      "POST", `/v1/topics/${seg(topic)}/messages/batch`, { messages: messages.map(envelope) }, {}, false);
    return body.results;
  }

  /** Begins a transaction with a half message; returns { txn_id, message_id, check_after_ms }. */
  async begin(topic, message, { checkAfterMs } = {}) {
    const env = envelope(message);
    if (checkAfterMs !== undefined) env.check_after_ms = checkAfterMs;
    const { body } = await this.#send("POST", `/v1/topics/${seg(topic)}/transactions`, env, {}, false);
    return { txn_id: body.txn_id, message_id: body.message_id, check_after_ms: body.check_after_ms };
  }

  /** Commits (idempotent); resolves to the state. A rolled-back one rejects with status 409. */
  async commit(txnId) {
    return (await this.#send("POST", `/v1/transactions/${seg(txnId)}/commit`, undefined, {}, true)).body.state;
  }

  /** Rolls back (idempotent); resolves to the state. A committed one rejects with status 409. */
  async rollback(txnId) {
    return (await this.#send("POST", `/v1/transactions/${seg(txnId)}/rollback`, undefined, {}, true)).body.state;
  }

  async #send(method, path, body, headers, safe) {
    const all = { ...headers };
    if (body !== undefined) all["content-type"] = "application/json";
    if (this.token) all.authorization = `Bearer ${this.token}`;
    const payload = body === undefined ? undefined : JSON.stringify(body);
    let backoff = this.backoffMs;
    for (let attempt = 1; ; attempt++) {
      let error;
      let again;
      let waitMs = backoff;
      try {
        const resp = await fetch(this.baseUrl + path, { method, headers: all, body: payload });
        const text = await resp.text();
        if (resp.ok) {
          try {
            return { headers: resp.headers, body: text ? JSON.parse(text) : {} };
          } catch {
            throw new WasmqError(resp.status, "bad_answer", `the answer is not JSON: ${text.slice(0, 200)}`);
          }
        }
        const retryAfter = Number.parseInt(resp.headers.get("retry-after") ?? "", 10);
        const retryAfterMs = Number.isFinite(retryAfter) ? Math.max(0, retryAfter) * 1000 : undefined;
        let code = "http_error";
        let message = text.slice(0, 500);
        try {
          const e = JSON.parse(text).error;
          if (e && typeof e.code === "string") ({ code, message } = e);
        } catch {
          // Not wasmq's error shape: keep the status and the text.
        }
        error = new WasmqError(resp.status, code, message, retryAfterMs);
        again = refusedBeforeWriting(resp.status, code) || (resp.status >= 500 && safe);
        if (retryAfterMs !== undefined) waitMs = retryAfterMs;
      } catch (e) {
        if (e instanceof WasmqError) throw e;
        const refused = e?.cause?.code === "ECONNREFUSED";
        error = new TransportError(`cannot reach wasmq at ${this.baseUrl}: ${e?.cause?.message ?? e.message}`, e);
        again = refused || safe;
      }
      if (!again || attempt >= this.maxAttempts) throw error;
      if (this.onRetry) await this.onRetry(error, attempt);
      await sleep(Math.min(waitMs, this.maxWaitMs));
      backoff = Math.min(backoff * 2, this.maxWaitMs);
    }
  }
}
