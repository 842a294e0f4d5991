"""The RabbitMQ RPC tutorial's fib, as a wasmrpc module written in Python.

Build it into a component with componentize-py (see guests/build):

    componentize-py -d ../../wit -w module componentize pyfib -o pyfib.wasm
"""

import wit_world
from componentize_py_types import Err
from wit_world import CallError_InvalidInput


def fib(n):
    # As in https://www.rabbitmq.com/tutorials/tutorial-six-python
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


class WitWorld(wit_world.WitWorld):
    def call(self, input: bytes) -> bytes:
        text = input.decode("utf-8", errors="replace").strip()
        if not text.isdigit():
            raise Err(CallError_InvalidInput(f"expected n as decimal text, got {text[:40]!r}"))
        return str(fib(int(text))).encode()
