"""The wasmrpc module {{name}}: the request body in, the reply body out."""

import wit_world
from componentize_py_types import Err
from wit_world import CallError_InvalidInput


class WitWorld(wit_world.WitWorld):
    def call(self, input: bytes) -> bytes:
        try:
            name = input.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Err(CallError_InvalidInput("expected UTF-8 text"))
        return f"hello, {name}".encode()
