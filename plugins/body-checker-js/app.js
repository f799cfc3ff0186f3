// The tests' transaction checker in JavaScript, exporting a consumer too (the `plugin` world):
// a half message's body says what to answer ("commit" or "rollback"); anything else is unknown.
// As a consumer it acks everything.

import * as wasmq from './wasmq.js';

const ANSWERS = { commit: wasmq.COMMIT, rollback: wasmq.ROLLBACK };

export const checker = wasmq.checker((message) => ANSWERS[message.json()] ?? wasmq.UNKNOWN);

export const consumer = wasmq.consumer(() => wasmq.ACK);
