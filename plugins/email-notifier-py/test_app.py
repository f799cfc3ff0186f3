"""Unit tests of the plugin's logic under plain CPython, with the SDK's fake host:
`PYTHONPATH=../../guest-sdk/python python3 -m unittest`."""

import unittest

import app
from wasmq import ACK, Reject, Retry, testing


class EmailNotifierTest(unittest.TestCase):
    def setUp(self):
        testing.reset()
        testing.set_config({"to": "{{email}}", "subject": "Welcome {{name}}", "text": "Hi {{name}}"})

    def test_renders_sends_once_and_retries_transient_failures(self):
        msg = testing.message({"email": "ann@example.com", "name": "Ann"})
        testing.fail_next("unavailable", "smtp down")
        self.assertEqual(app.handle(msg), Retry(0))
        self.assertEqual(app.handle(msg), ACK)
        self.assertEqual(app.handle(msg), ACK)
        self.assertEqual(testing.emails(), [("ann@example.com", "Welcome Ann", "Hi Ann", None)])

    def test_rejects_what_retrying_cannot_fix(self):
        self.assertIsInstance(app.handle(testing.message({"name": "Bob"})), Reject)
        self.assertIsInstance(app.handle(testing.message("not json")), Reject)
        testing.fail_next("denied", "email not granted")
        out = app.handle(testing.message({"email": "c@example.com"}))
        self.assertEqual(out, Reject("denied: email not granted"))
        testing.set_config({"subject": "no recipient template"})
        self.assertIsInstance(app.handle(testing.message({"email": "c@example.com"})), Reject)
        self.assertEqual(testing.emails(), [])


if __name__ == "__main__":
    unittest.main()
