"""Sends one email per message: the email-notifier plugin again, in Python. The subscription's
config holds templates filled from the message's JSON body: {"to": "{{email}}", "subject":
"Welcome {{name}}", "text": "...", "html": null}. Needs the `email` grant. No recipient: reject.
A transient SMTP failure: retry. A retried message never sends a second email."""

import wasmq
from wasmq.template import recipient, render


@wasmq.consumer
def handle(message: wasmq.Message):
    try:
        config = wasmq.context.config()
        to_t, subject_t, text_t = config["to"], config["subject"], config["text"]
    except (wasmq.HostError, KeyError, TypeError) as e:
        return wasmq.Reject(f"bad config: {e}")
    try:
        data = message.json()
    except ValueError:
        return wasmq.Reject("the message body is not JSON")
    to = recipient(to_t, data)
    if to is None:
        return wasmq.Reject(f"no recipient in {to_t!r}")
    subject, text = render(subject_t, data)[0], render(text_t, data)[0]
    html = render(config["html"], data)[0] if config.get("html") else None
    return wasmq.outcome_of(
        lambda: wasmq.once(message.id, lambda: wasmq.email.send(to, subject, text, html)))
