"""vblk's build: setuptools, with the modules on the request path compiled by mypyc.

The modules listed under ``[tool.vblk] compiled`` in pyproject.toml (the rings, the device
and driver, the DMA allocator, the NBD codec and server) are compiled to C extensions by
mypyc from the same type-annotated source: the code stays Python, the interpreter's
per-bytecode work goes away. ``VBLK_COMPILE=0`` builds pure Python instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path

from setuptools import setup


def compiled_modules() -> list[str]:
    """The source files to compile, from pyproject.toml (tests read the same list)."""
    pyproject = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())
    modules: list[str] = pyproject["tool"]["vblk"]["compiled"]
    return modules


def have_compiler() -> bool:
    """A C compiler and the interpreter's headers, which mypyc's output needs."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(os.environ.get("CC", compiler).split()[0]) is not None and headers.exists()


ext_modules = []
if os.environ.get("VBLK_COMPILE", "1") == "0":
    pass
elif not have_compiler():
    print(
        "vblk: WARNING: no C compiler or Python headers (install gcc and python3-dev):"
        " building pure Python, which is slower (VBLK_COMPILE=0 silences this)",
        file=sys.stderr,
    )
else:
    from mypyc.build import mypycify

    ext_modules = mypycify(compiled_modules(), opt_level="3", debug_level="1")

setup(ext_modules=ext_modules)
