// Misbehaves on request, for the limit tests: {"do": "spin"} loops forever, {"do": "hog"}
// allocates without bound, {"do": "raw-log"} hands `log-utf8` a line of 1 MiB that is not
// UTF-8 and holds a forged line break and a terminal escape; anything else acks.

import { logUtf8 } from 'wasmq:plugin/log@0.1.0';
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
  if (what === 'raw-log') {
    const line = new Uint8Array(1 << 20).fill(0x61);
    line.set([0xff, 0xfe, 0x0a, 0x1b, 0x5b, 0x32, 0x4a, 0xc3]);
    logUtf8('warn', line);
  }
  return wasmq.ACK;
});
