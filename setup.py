from setuptools import Extension, setup

setup(
    cffi_modules=[
        "hostscript/_build.py:ffi_lua54",
        "hostscript/_build.py:ffi_luajit",
    ],
    # hs_fire's entry point from Python: keeps the GIL for short fires (hostscript/_fire.c)
    ext_modules=[Extension("hostscript._fire", ["hostscript/_fire.c"], extra_compile_args=["-O2"])],
)
