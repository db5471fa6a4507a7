"""Build of the optional compiled CPU kernels (everything else is in pyproject.toml).

``probmask.kernels._cpu`` is plain C against the CPython API. If it cannot be built (no C compiler
or no Python headers), installation still succeeds and probmask uses PyTorch operations instead:
``probmask.kernels.cpu.available()`` tells which.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2"]
else:
    # no -ffast-math: the kernels rely on the order of operations as written (and at link time
    # older GCC versions would add a start-up routine that sets flush-to-zero process-wide)
    compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c11", "-pthread"]

setup(
    ext_modules=[
        Extension(
            "probmask.kernels._cpu",
            sources=["src/probmask/kernels/_cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
