"""Tests of the SDK's own helpers under plain CPython with its fake host:
`python3 -m unittest` in guest-sdk/python."""

import unittest

import wasmq
from wasmq import testing
from wasmq.template import recipient, render


class SdkTest(unittest.TestCase):
    def setUp(self):
        testing.reset()

    def test_once_runs_a_side_effect_once_per_message_and_again_after_a_failure(self):
        def send():
            wasmq.email.send("a@b.c", "hi", "text")
        testing.fail_next("unavailable", "smtp down")
        with self.assertRaises(wasmq.HostError) as e:
            wasmq.once("m1", send)
        self.assertTrue(e.exception.transient)
        self.assertEqual(testing.emails(), [])
        self.assertTrue(wasmq.once("m1", send))
        self.assertFalse(wasmq.once("m1", send))
        self.assertTrue(wasmq.once("m2", send))
        self.assertEqual(len(testing.emails()), 2)

    def test_outcome_of_maps_host_errors_and_lets_bugs_through(self):
        testing.fail_next("unavailable", "later")
        self.assertEqual(wasmq.outcome_of(lambda: wasmq.sms.send("+1", "x")), wasmq.Retry(0))
        testing.fail_next("denied", "no sms grant")
        self.assertEqual(wasmq.outcome_of(lambda: wasmq.sms.send("+1", "x")),
                         wasmq.Reject("denied: no sms grant"))
        self.assertEqual(wasmq.outcome_of(lambda: wasmq.sms.send("+1", "x")), wasmq.ACK)
        with self.assertRaises(ZeroDivisionError):
            wasmq.outcome_of(lambda: 1 / 0)

    def test_kv_json_config_and_messages(self):
        wasmq.kv.set_json("k", [1, 2])
        self.assertEqual(wasmq.kv.get_json("k"), [1, 2])
        self.assertIsNone(wasmq.kv.get_json("missing"))
        wasmq.kv.set("bad", b"{")
        with self.assertRaises(wasmq.HostError) as e:
            wasmq.kv.get_json("bad")
        self.assertEqual(e.exception.kind, "invalid")
        self.assertEqual(wasmq.kv.list_keys(""), ["bad", "k"])
        testing.set_config("not json")
        with self.assertRaises(wasmq.HostError):
            wasmq.context.config()
        m = testing.message({"a": 1}, properties=[("p", "v")])
        self.assertEqual((m.json(), m.property("p"), m.property("q")), ({"a": 1}, "v", None))
        self.assertIsNone(testing.message(b"\xff").text())
        wasmq.publish.send_json("t", {"x": 1}, key="k1")
        self.assertEqual(testing.published()[0]["key"], "k1")

    def test_templates_follow_the_rust_rules(self):
        data = {"name": "Ann", "user": {"email": "ann@example.com", "age": 31}, "tags": ["a", "b"]}
        self.assertEqual(
            render("Hi {{name}} <{{ user.email }}>, {{user.age}} {{tags.1}}", data),
            ("Hi Ann <ann@example.com>, 31 b", []))
        self.assertEqual(render("to {{phone}}{{user.zip}}!", data), ("to !", ["phone", "user.zip"]))
        self.assertEqual(render("no {{ end", data)[0], "no {{ end")
        self.assertEqual(recipient("{{user.email}}", data), "ann@example.com")
        self.assertIsNone(recipient("{{phone}}", data))
        self.assertIsNone(recipient("{{x}}", {"x": "  "}))


if __name__ == "__main__":
    unittest.main()
