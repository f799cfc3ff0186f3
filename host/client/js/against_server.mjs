// Exercises the JavaScript client against a real server (run by tests/tests/clients.rs, which
// sets WASMQ_URL and makes the topics js-orders, js-txn and js-slow, the last with a
// subscription js-slow that consumes one message per ~17 minutes while max_backlog is 2).
import assert from "node:assert/strict";
import { Client, TransportError, WasmqError } from "./index.js";

const url = process.env.WASMQ_URL;
const client = new Client(url);
const get = async (path) => (await fetch(url + path)).json();
const rejects = async (promise, status, code) => {
  const e = await promise.then(() => assert.fail("expected an error"), (e) => e);
  assert.ok(e instanceof WasmqError, String(e));
  assert.equal(e.status, status);
  if (code) assert.equal(e.code, code);
  return e;
};

// Publish: JSON, bytes, envelope fields; read back through the API.
const a = await client.publish("js-orders", { body: { order: 1 }, key: "o-1", tag: "created", sharding_key: "u-1", properties: { via: "js" } });
const m = await get(`/v1/messages/${a.id}`);
assert.deepEqual([m.body, m.key, m.tag, m.sharding_key, m.properties], [{ order: 1 }, "o-1", "created", "u-1", { via: "js" }]);
const b = await client.publish("js-orders", { data: new Uint8Array([0, 255, 16]) });
assert.equal((await get(`/v1/messages/${b.id}`)).body_base64, "AP8Q");
// An idempotency key: the repeat stores nothing and says so; another message under it is refused.
const first = await client.publish("js-orders", { body: { order: 2 } }, { idempotencyKey: "js-k" });
const again = await client.publish("js-orders", { body: { order: 2 } }, { idempotencyKey: "js-k" });
assert.deepEqual([again.id, again.replayed, first.replayed], [first.id, true, false]);
await rejects(client.publish("js-orders", { body: { order: 3 } }, { idempotencyKey: "js-k" }), 422, "idempotency_key_reused");
// A batch, atomically.
const batch = await client.publishBatch("js-orders", [{ body: { n: 1 } }, { body: { n: 2 }, key: "b-2" }]);
assert.equal(batch.length, 2);
// Typed errors.
await rejects(client.publish("js-nope", { body: 1 }), 404, "unknown_topic");
await rejects(client.publish("js-orders", { body: 1, tag: "a|b" }), 400);
const down = await new Client("http://127.0.0.1:1", { maxAttempts: 2, backoffMs: 10 }).publish("t", { body: 1 }).catch((e) => e);
assert.ok(down instanceof TransportError, String(down));
assert.throws(() => new Client("127.0.0.1:7700"), TypeError);
assert.throws(() => new Client(url, { maxAttempts: Number("many") }), TypeError);
await assert.rejects(client.publish("js-orders", { body: 1 }, { idempotencyKey: "" }), TypeError);
// Transactions: begin, commit (twice: idempotent), rollback of another; the opposite decision is a 409.
const t = await client.begin("js-txn", { body: { order: 9 } }, { checkAfterMs: 60000 });
assert.equal(await client.commit(t.txn_id), "committed");
assert.equal(await client.commit(t.txn_id), "committed");
assert.deepEqual((await get(`/v1/messages/${t.message_id}`)).body, { order: 9 });
const r = await client.begin("js-txn", { body: { order: 10 } });
assert.equal(await client.rollback(r.txn_id), "rolled_back");
await rejects(client.commit(r.txn_id), 409);
// 429: refused while the slow subscription is behind; the retry after Retry-After succeeds once
// onRetry (the first refusal) has deleted that subscription.
let pushedBack = false;
for (let i = 0; i < 100 && !pushedBack; i++) {
  const e = await new Client(url, { maxAttempts: 1 }).publish("js-slow", { body: { fill: true } }).then(() => null, (e) => e);
  if (e) {
    assert.ok(e instanceof WasmqError && e.overloaded, String(e));
    assert.deepEqual([e.status, e.code, e.retryAfterMs], [429, "backlog_full", 1000]);
    pushedBack = true;
  }
}
assert.ok(pushedBack, "max_backlog 2 never pushed back in 100 publishes");
await rejects(new Client(url, { maxAttempts: 2, maxWaitMs: 50 }).publish("js-slow", { body: 1 }), 429, "backlog_full");
const seen = [];
const late = await new Client(url, {
  maxAttempts: 30,
  maxWaitMs: 1000,
  onRetry: async (error, attempt) => {
    seen.push([error.status, attempt]);
    if (seen.length === 1) await fetch(`${url}/v1/subscriptions/js-slow`, { method: "DELETE" });
  },
}).publish("js-slow", { body: { late: true } });
assert.deepEqual(seen[0], [429, 1]);
assert.deepEqual((await get(`/v1/messages/${late.id}`)).body, { late: true });
console.log(`javascript client: ok (${seen.length} retries)`);
