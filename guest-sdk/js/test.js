// Tests of the SDK's own helpers under Node.js with its fake host:
// `node --import ./testing.js --test` in guest-sdk/js.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as testing from './testing.js';
import * as wasmq from './wasmq.js';

test('once runs a side effect once per message, and again after a failure', () => {
  testing.reset();
  const send = () => wasmq.email.send('a@b.c', 'hi', 'text');
  testing.failNext('unavailable', 'smtp down');
  assert.throws(() => wasmq.once('m1', send), (e) => e instanceof wasmq.HostError && e.transient);
  assert.equal(testing.emails().length, 0);
  assert.equal(wasmq.once('m1', send), true);
  assert.equal(wasmq.once('m1', send), false);
  assert.equal(wasmq.once('m2', send), true);
  assert.equal(testing.emails().length, 2);
});

test('outcomeOf maps host errors to retry or reject and lets bugs through', () => {
  testing.reset();
  testing.failNext('unavailable', 'later');
  assert.deepEqual(wasmq.outcomeOf(() => wasmq.sms.send('+1', 'x')), { tag: 'retry', val: 0n });
  testing.failNext('denied', 'no sms grant');
  assert.deepEqual(wasmq.outcomeOf(() => wasmq.sms.send('+1', 'x')), { tag: 'reject', val: 'denied: no sms grant' });
  assert.deepEqual(wasmq.outcomeOf(() => wasmq.sms.send('+1', 'x')), wasmq.ACK);
  assert.throws(() => wasmq.outcomeOf(() => { throw new TypeError('bug'); }), TypeError);
});

test('kv JSON, config, messages and export checks', () => {
  testing.reset();
  wasmq.kv.setJson('k', [1, 2]);
  assert.deepEqual(wasmq.kv.getJson('k'), [1, 2]);
  assert.equal(wasmq.kv.getJson('missing'), undefined);
  wasmq.kv.set('bad', '{');
  assert.throws(() => wasmq.kv.getJson('bad'), (e) => e.kind === 'invalid');
  assert.deepEqual(wasmq.kv.listKeys(''), ['bad', 'k']);
  testing.setConfig('not json');
  assert.throws(() => wasmq.context.config(), (e) => e.kind === 'invalid');
  const m = new wasmq.Message(testing.message({ a: 1 }, { properties: [['p', 'v']], offset: 7n }));
  assert.deepEqual(m.json(), { a: 1 });
  assert.equal(m.property('p'), 'v');
  assert.equal(m.offset, 7);
  assert.equal(new wasmq.Message(testing.message('', { body: new Uint8Array([0xff]) })).text(), null);
  // A handler that returns something else than an outcome is a bug: it throws (the host traps).
  assert.throws(() => wasmq.consumer(() => 'ok').handle(testing.message('{}')), TypeError);
  assert.throws(() => wasmq.checker(() => 'yes').checkTransaction(testing.message('{}')), TypeError);
  assert.equal(wasmq.checker(() => wasmq.COMMIT).checkTransaction(testing.message('{}')), 'commit');
  assert.deepEqual(wasmq.retry(12.7), { tag: 'retry', val: 12n });
});

test('log lines reach the host as UTF-8 bytes and read back as the same text', () => {
  testing.reset();
  wasmq.log.info('zoë 🚀 例え');
  wasmq.log.warn(42);
  assert.deepEqual(testing.logs(), [['info', 'zoë 🚀 例え'], ['warn', '42']]);
});
