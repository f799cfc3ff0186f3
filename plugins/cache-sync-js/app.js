// A local price cache per instance (the price-sync scenario), in JavaScript: every broadcast
// instance gets every update and keeps its own table in memory. {"sku","price","seq"} updates it
// (an older seq never overwrites a newer one); {"snapshot": true} publishes the instance's table
// to the config's `report` topic. Config fail_instance/fail_attempts/fail_below_seq make one
// instance fail the first attempts of the early updates (the scenario's failing node).

import * as wasmq from './wasmq.js';

// sku -> [price, seq]; lives as long as the instance.
const prices = new Map();

export const consumer = wasmq.consumer((message) => {
  let config;
  try {
    config = wasmq.context.config();
  } catch {
    return wasmq.reject('config needs a report topic');
  }
  if (typeof config.report !== 'string') return wasmq.reject('config needs a report topic');
  const me = wasmq.context.identity().instanceIndex;
  let update;
  try {
    update = message.json();
  } catch (e) {
    return wasmq.reject(`not a price update: ${e.message}`);
  }
  if (typeof update.sku === 'string' && typeof update.price === 'number' && Number.isInteger(update.seq)) {
    if (config.fail_instance === me && update.seq < (config.fail_below_seq ?? 0) && message.attempt <= (config.fail_attempts ?? 0)) {
      return wasmq.retry(0);
    }
    const known = prices.get(update.sku);
    if (!known || known[1] < update.seq) prices.set(update.sku, [update.price, update.seq]);
    return wasmq.ACK;
  }
  if (update.snapshot === true) {
    const table = Object.fromEntries([...prices.entries()].sort().map(([sku, [price]]) => [sku, price]));
    return wasmq.outcomeOf(() => wasmq.publish.sendJson(config.report, { instance: me, prices: table }));
  }
  if (update.snapshot === false) return wasmq.ACK;
  return wasmq.reject(`not a price update: ${message.text()}`);
});
