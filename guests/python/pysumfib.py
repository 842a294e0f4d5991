"""sumfib in Python: a module that calls the fleet.

The input is a range `a..b`; every F(n) of it is computed by the `fib`
module, all at once through `call_all`, and the answer is their sum. Its
manifest must let it call fib (`calls = ["fib"]` in pysumfib.toml).

Build it into a component with componentize-py (see guests/build-lang):

    componentize-py -d ../../wit -w fleet-module componentize pysumfib -o pysumfib.wasm
"""

import wit_world
from componentize_py_types import Err, Ok
from wit_world import CallError_Failed, CallError_InvalidInput
from wit_world.imports import fleet

# Calls per call_all: within a node's default cap of 64.
BATCH = 64


def parse(text):
    first, sep, last = text.partition("..")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise Err(CallError_InvalidInput(f"expected a range a..b, got {text[:40]!r}"))
    first, last = int(first), int(last)
    if first > last or last - first >= 10_000:
        raise Err(CallError_InvalidInput(f"the range {first}..{last} is empty or too long"))
    return first, last


class WitWorld(wit_world.WitWorld):
    def call(self, input: bytes) -> bytes:
        first, last = parse(input.decode("utf-8", errors="replace").strip())
        numbers = list(range(first, last + 1))
        total = 0
        for start in range(0, len(numbers), BATCH):
            batch = numbers[start : start + BATCH]
            results = fleet.call_all([("fib", str(n).encode()) for n in batch])
            for n, result in zip(batch, results):
                if isinstance(result, Err):
                    error = result.value
                    raise Err(CallError_Failed(f"fib {n}: {error.kind}: {error.message}"))
                total += int(result.value)
        return str(total).encode()
