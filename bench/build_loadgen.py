"""Build bench/_loadgen.pyx in place (bench/_loadgen.*.so), with the venv's Cython and gcc.

    .venv/bin/python bench/build_loadgen.py        # or: make loadgen

Like the broker's compiled core (setup.py), the extension links no libzmq: it
includes src/fastbroker/_zmqdl.h and resolves libzmq's functions at import time
through pyzmq's own extension module, so it drives pyzmq's sockets with pyzmq's
bundled libzmq. Only libdl is linked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    os.chdir(REPO)
    ext = Extension(
        "bench._loadgen",
        ["bench/_loadgen.pyx"],
        include_dirs=["src/fastbroker"],
        libraries=["dl"],
        extra_compile_args=["-O2"],
    )
    dist = Distribution(
        {
            "name": "fastbroker-bench-loadgen",
            "ext_modules": cythonize([ext], language_level=3, quiet=True, include_path=["src"]),
        }
    )
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(REPO / "build" / "loadgen")
    dist.run_command("build_ext")
    out = cmd.get_ext_fullpath("bench._loadgen")
    print(f"built {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
