"""The one native module, broker._fast (the broker's hot path, broker/fastpath.py);
everything else is in pyproject.toml. Linux only, as the broker is."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "broker._fast",
            ["broker/_fast.c", "broker/_fastwire.c"],
            depends=["broker/_fast.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            # Without a compiler the install still works: the broker then
            # serves every request in Python (and says so when it starts).
            optional=True,
        )
    ]
)
