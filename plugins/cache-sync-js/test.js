// Unit tests of the plugin's logic under Node.js with the SDK's fake host:
// `node --import ./testing.js --test` (testing.js and wasmq.js resolve to guest-sdk/js here).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as testing from './testing.js';
import { consumer } from './app.js';

const handle = (body, fields) => consumer.handle(testing.message(body, fields));

test('keeps the newest price of each sku and reports its table', () => {
  testing.reset();
  testing.setConfig({ report: 'price-report' });
  assert.deepEqual(handle({ sku: 'a', price: 2.5, seq: 2 }), { tag: 'ack' });
  assert.deepEqual(handle({ sku: 'a', price: 1, seq: 1 }), { tag: 'ack' }); // older: ignored
  assert.deepEqual(handle({ sku: 'b', price: 7, seq: 3 }), { tag: 'ack' });
  assert.deepEqual(handle({ snapshot: true }), { tag: 'ack' });
  const [report] = testing.published();
  assert.equal(report.topic, 'price-report');
  assert.deepEqual(JSON.parse(report.body), { instance: 0, prices: { a: 2.5, b: 7 } });
});

test('the configured failing instance retries early updates; junk is rejected', () => {
  testing.reset();
  testing.setConfig({ report: 'r', fail_instance: 2, fail_attempts: 1, fail_below_seq: 10 });
  testing.setIdentity({ instanceIndex: 2, instanceCount: 4 });
  assert.deepEqual(handle({ sku: 'c', price: 1, seq: 5 }), { tag: 'retry', val: 0n });
  assert.deepEqual(handle({ sku: 'c', price: 1, seq: 5 }, { attempt: 2 }), { tag: 'ack' });
  assert.deepEqual(handle({ sku: 'c', price: 1, seq: 11 }), { tag: 'ack' });
  assert.equal(handle('not json').tag, 'reject');
  assert.equal(handle({ sku: 'c' }).tag, 'reject');
  testing.setConfig('{}');
  assert.deepEqual(handle({ sku: 'c', price: 1, seq: 12 }), { tag: 'reject', val: 'config needs a report topic' });
});

test('a publish the host refuses dead-letters the snapshot', () => {
  testing.reset();
  testing.setConfig({ report: 'r' });
  testing.failNext('denied', 'publish to r not granted');
  assert.deepEqual(handle({ snapshot: true }), { tag: 'reject', val: 'denied: publish to r not granted' });
});
