"""The request path runs compiled (mypyc, setup.py) unless vblk was built with VBLK_COMPILE=0."""

from __future__ import annotations

import importlib
import os

from service.metrics import compiled
from tests.build import REPO, compiled_sources, extension_of


def test_request_path_is_compiled_as_built() -> None:
    want = os.environ.get("VBLK_COMPILE", "1") != "0"
    sources = compiled_sources()
    assert len(sources) >= 10
    for source in sources:
        name = ".".join(source.relative_to(REPO).with_suffix("").parts)
        module = importlib.import_module(name)
        assert module.__file__ is not None
        is_extension = not module.__file__.endswith(".py")
        assert is_extension == want, f"{name} is loaded from {module.__file__}"
        assert (extension_of(source) is not None) == want
    assert compiled() == want
