"""Build of the optional compiled CPU kernels (everything else is in pyproject.toml).

``probmask.kernels._cpu`` is plain C11 against the CPython API, with POSIX threads. If it cannot
be built (no C compiler, no Python headers, a compiler that rejects the flags below), installation
still succeeds (``optional=True``) and probmask uses PyTorch operations instead:
``probmask.kernels.cpu.available()`` tells which.

On Windows the extension is not built at all: MSVC has no POSIX threads and no GCC-style flags,
and the kernels are not tested there; PyTorch operations are used.
"""

import sys

from setuptools import Extension, setup

# GCC-style flags, which clang (Linux, macOS) and the other Unix compilers that CPython is built
# with also take. No -ffast-math: the kernels rely on the order of operations as written (and at
# link time older GCC versions would add a start-up routine that sets flush-to-zero
# process-wide). -pthread compiles and links the worker pool; libm also brings glibc's vector
# maths library (libmvec) where GCC uses it.
compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c11", "-pthread"]

extensions = (
    []
    if sys.platform == "win32"
    else [
        Extension(
            "probmask.kernels._cpu",
            sources=["src/probmask/kernels/_cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        )
    ]
)

setup(ext_modules=extensions)
