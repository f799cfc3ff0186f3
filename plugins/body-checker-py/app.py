"""The tests' transaction checker in Python: a half message's body says what to answer
("commit" or "rollback"); anything else is unknown."""

import wasmq


@wasmq.checker
def check(message: wasmq.Message):
    answer = message.json()
    return {"commit": wasmq.COMMIT, "rollback": wasmq.ROLLBACK}.get(answer, wasmq.UNKNOWN)
