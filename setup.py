"""The one native module, privbroker.broker.files._fast (the broker's hot path,
broker/files/fastpath.py, with its SOCKET half in broker/net/_fastsock.c);
everything else is in pyproject.toml. Linux only, as the broker is."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "privbroker.broker.files._fast",
            ["broker/files/_fast.c", "broker/files/_fastwire.c", "broker/net/_fastsock.c"],
            depends=["broker/files/_fast.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            # Without a compiler the install still works: the broker then
            # serves every request in Python (and says so when it starts).
            optional=True,
        )
    ]
)
