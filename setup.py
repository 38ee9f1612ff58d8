from setuptools import setup

setup(
    cffi_modules=[
        "hostscript/_build.py:ffi_lua54",
        "hostscript/_build.py:ffi_luajit",
    ],
)
