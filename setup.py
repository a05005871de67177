"""Build the compiled parts; everything else is in pyproject.toml.

The extension needs no zmq.h and links no libzmq: it resolves libzmq's functions at
import time from the copy pyzmq already loaded (see src/fastbroker/_zmqdl.h).
A compiler error fails the build; the pure core is a run-time choice, not a fallback
for a broken build.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

# One extension module from one .pyx: _core.pyx includes its parts, core/*.pxi (found
# relative to it; cythonize rebuilds when one of them changes), and _core.pxd declares them.
core = Extension(
    "fastbroker._core",
    ["src/fastbroker/_core.pyx"],
    include_dirs=["src/fastbroker"],
    libraries=["dl"],
    extra_compile_args=["-O2"],
)
# The worker's compiled session: its I/O loop on a thread of its own, without the GIL.
worker_session = Extension(
    "fastbroker.worker._session",
    ["src/fastbroker/worker/_session.pyx"],
    include_dirs=["src/fastbroker"],
    libraries=["dl", "pthread"],
    extra_compile_args=["-O2"],
)

# Whole messages in and out of a client's socket in one call (the client's I/O loop).
client_wire = Extension(
    "fastbroker.client._wire",
    ["src/fastbroker/client/_wire.pyx"],
    include_dirs=["src/fastbroker"],
    libraries=["dl"],
    extra_compile_args=["-O2"],
)

# The client's RequestBook compiled (twin of client/book.py).
client_book = Extension(
    "fastbroker.client._book",
    ["src/fastbroker/client/_book.pyx"],
    extra_compile_args=["-O2"],
)

log_index = Extension(
    "fastbroker.server._log_index",
    ["src/fastbroker/server/_log_index.pyx"],
    include_dirs=["src/fastbroker"],
    extra_compile_args=["-O2"],
)

setup(
    ext_modules=cythonize(
        [core, worker_session, client_wire, client_book, log_index], language_level=3, compiler_directives={"embedsignature": True}
    )
)
