// Misbehaves on request, for the limit tests: {"do": "spin"} loops forever, {"do": "hog"}
// allocates without bound; anything else acks.

import * as wasmq from './wasmq.js';

export const consumer = wasmq.consumer((message) => {
  const what = message.json().do;
  if (what === 'spin') {
    let n = 0;
    for (;;) n += 1;
  }
  if (what === 'hog') {
    const hoard = [];
    for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
  }
  return wasmq.ACK;
});
