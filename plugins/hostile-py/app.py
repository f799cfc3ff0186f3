"""Misbehaves on request, for the limit tests: {"do": "spin"} loops forever, {"do": "hog"}
allocates without bound, {"do": "sleep", "s": 3} sleeps; anything else acks."""

import time

import wasmq


@wasmq.consumer
def handle(message: wasmq.Message):
    what = message.json().get("do")
    if what == "spin":
        n = 0
        while True:
            n += 1
    if what == "sleep":
        time.sleep(float(message.json().get("s", 1)))
    if what == "hog":
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
    return wasmq.ACK
