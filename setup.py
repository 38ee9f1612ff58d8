from setuptools import Extension, setup

setup(
    cffi_modules=[
        "hostscript/_build.py:ffi_lua54",
        "hostscript/_build.py:ffi_luajit",
    ],
    # the hot path from Python, keeping the GIL for short fires (hostscript/_bridge.c)
    ext_modules=[Extension("hostscript._bridge", ["hostscript/_bridge.c"], extra_compile_args=["-O2"])],
)
