"""R1, R1b and R2 — one request, the request object alone, a no-op fire on a reused
request — and the C floor (hs_fire against a bare lua_pcall). Also the ways lupa can
build a request, which is how the lupa contestant's constructor was chosen."""
from __future__ import annotations

import itertools
from typing import Any

import pytest

from . import contestants as cs
from . import native
from .conftest import pick
from .workloads import METHOD, REQUEST_HEADERS, URI

ARGS = (METHOD, URI, REQUEST_HEADERS)
WHO = ["hostscript", "python", "lupa"]


@pytest.mark.parametrize("who", WHO)
def test_request_flow(benchmark: Any, engine: str, flow: dict, who: str) -> None:
    benchmark.group = f"request-flow[{engine}]"
    benchmark(pick(flow, who, engine).serve, *ARGS)


@pytest.mark.parametrize("who", WHO + ["python dict"])
def test_build_request(benchmark: Any, engine: str, flow: dict, who: str) -> None:
    benchmark.group = f"build-request[{engine}]"
    build = cs.header_dict if who == "python dict" else pick(flow, who, engine).new_request
    benchmark(build, *ARGS)


@pytest.mark.parametrize("who", WHO)
def test_noop_fire(benchmark: Any, engine: str, flow: dict, who: str) -> None:
    benchmark.group = f"noop-fire[{engine}]"
    c = pick(flow, who, engine)
    request, fire = c.new_request(*ARGS), c.fire_function()
    fire("log", request)
    benchmark(fire, "log", request)


# The request constructors we measured for lupa; contestants.LUPA_TXN_LUA is "cached lower".
_LUPA_BUILDS = {
    "cached lower": (cs.LUPA_TXN_LUA, lambda new, rt: new(METHOD, URI, *itertools.chain.from_iterable(
        REQUEST_HEADERS))),
    "string.lower": (cs.LUPA_TXN_LUA.replace("LOWER[flat[i]]", "lower(flat[i])"),
                     lambda new, rt: new(METHOD, URI, *itertools.chain.from_iterable(REQUEST_HEADERS))),
    "python lower": (cs.LUPA_TXN_LUA.replace("LOWER[flat[i]]", "flat[i]"),
                     lambda new, rt: new(METHOD, URI,
                                         *[x for n, v in REQUEST_HEADERS for x in (n.lower(), v)])),
    "table_from": ("return function(method, uri, headers)\n  local resp_headers = {}\n"
                   "  return {req = {method = method, uri = uri, headers = headers},\n"
                   "          resp = {headers = resp_headers}, ctx = {}}, resp_headers\nend\n",
                   lambda new, rt: new(METHOD, URI, rt.table_from(
                       {n.lower(): v for n, v in REQUEST_HEADERS}))),
}


@pytest.mark.parametrize("way", list(_LUPA_BUILDS))
def test_lupa_build_request(benchmark: Any, engine: str, need_lupa: None, way: str) -> None:
    benchmark.group = f"lupa-build-request[{engine}]"
    source, build = _LUPA_BUILDS[way]
    rt = cs.lupa_module(engine).LuaRuntime()
    new = rt.execute(source)
    txn, _ = build(new, rt)
    assert txn.req.headers["user-agent"] == dict(REQUEST_HEADERS)["User-Agent"]
    benchmark(build, new, rt)


def test_c_fire(benchmark: Any, engine: str) -> None:
    """The C program reports its own median rounds; the figures are in extra_info."""
    benchmark.group = f"c-fire[{engine}]"
    try:
        pcall_ns, fire_ns = benchmark.pedantic(native.run_fire_bench, args=(engine, 1_000_000, 7),
                                               rounds=1, iterations=1)
    except native.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(pcall_ns=pcall_ns, fire_ns=fire_ns, ratio=fire_ns / pcall_ns)
