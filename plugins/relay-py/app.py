"""Exercises the remaining capabilities from Python, for the tests: a message
{"to", "text", "url"} sends an SMS, POSTs the text to `url` (an allow-listed origin), and
publishes what the endpoint answered to the config's `out` topic. A denied call dead-letters."""

import wasmq


@wasmq.consumer
def handle(message: wasmq.Message):
    order = message.json()
    out = wasmq.context.config()["out"]
    me = wasmq.context.identity()

    def relay():
        wasmq.sms.send(order["to"], order["text"])
        answer = wasmq.http.request("POST", order["url"], [("content-type", "text/plain")],
                                    order["text"])
        wasmq.publish.send_json(out, {"status": answer.status, "body": answer.body.decode(),
                                      "group": me.group, "lang": "python"},
                                key=message.id)

    return wasmq.outcome_of(relay)
