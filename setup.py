from setuptools import Extension, setup

setup(
    cffi_modules=[
        "hostscript/_build.py:ffi_lua54",
        "hostscript/_build.py:ffi_luajit",
    ],
    # The hot path from Python (Host.fire keeps the GIL for short fires) and the
    # Transaction types over the core's transaction storage, which needs no Lua:
    # built once, serving both engines.
    ext_modules=[Extension(
        "hostscript._bridge",
        ["hostscript/_bridge.c", "hostscript/_transaction.c", "hostscript/_ctx.c",
         "native/txn.c", "native/buf.c"],
        include_dirs=["native"],
        depends=["hostscript/_bridge.h", "native/txn.h", "native/buf.h", "native/hostscript.h"],
        extra_compile_args=["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall"],
    )],
)
