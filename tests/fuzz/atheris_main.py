"""Coverage-guided fuzzing of vblk's parsers with atheris (libFuzzer), driving the same
hypothesis properties the test suite runs. Not part of the suite; run it by hand:

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz.atheris_main nbd -max_total_time=600      # NBD codec
    .venv/bin/python -m tests.fuzz.atheris_main nbd-options -max_total_time=600
    .venv/bin/python -m tests.fuzz.atheris_main ring -max_total_time=600     # virtqueue parser
    .venv/bin/python -m tests.fuzz.atheris_main ring-packed -max_total_time=600   # packed ring
    .venv/bin/python -m tests.fuzz.atheris_main ranges -max_total_time=600   # HTTP Range

Each target is a hypothesis test; ``fuzz_one_input`` turns libFuzzer's bytes into its examples,
so a crash found here is a failing example the suite can replay.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

TARGETS = {
    "nbd": ("tests.service.test_nbd_protocol", "test_fuzzed_input_yields_events_or_a_protocol_error"),
    "nbd-options": ("tests.service.test_nbd_protocol", "test_fuzzed_options_always_answered"),
    "ring": ("tests.device.test_virtqueue_fuzz", "test_pop_returns_a_valid_chain_or_raises_virtqueue_error"),
    "ring-packed": (
        "tests.device.test_packed_virtqueue_fuzz",
        "test_pop_returns_a_valid_buffer_or_raises_virtqueue_error",
    ),
    "ranges": ("tests.service.test_ranges", "test_any_header_parses_or_is_refused"),
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    atheris: Any = importlib.import_module("atheris")
    module_name, test_name = TARGETS[argv[1]]
    with atheris.instrument_imports(include=["service", "device"]):
        module = importlib.import_module(module_name)
    test = getattr(module, test_name)
    fuzz_one_input: Callable[[bytes], Any] = test.hypothesis.fuzz_one_input
    atheris.Setup([argv[0], *argv[2:]], fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
