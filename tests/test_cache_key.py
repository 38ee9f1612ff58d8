"""txn:set_cache_key — the secondary part of a response's cache key, read by the host."""
from __future__ import annotations

import pytest

import hostscript


def test_set_cache_key_reaches_the_host_and_later_hooks(host):
    host.load("""
        local C = {}
        function C:on_read_request(txn) txn:set_cache_key("gen\\0" .. txn.req.headers.abc) end
        function C:on_send_request(txn) txn.req.headers["x-seen-key"] = txn.cache_key:gsub("%z", "|") end
        return C""", name="k.lua")
    txn = hostscript.Transaction("GET", "/", [("abc", "bennet")])
    assert txn.cache_key == b""
    host.fire("read_request", txn)
    assert txn.cache_key == b"gen\0bennet"
    host.fire("send_request", txn)
    assert txn.request.headers["x-seen-key"] == "gen|bennet"


def test_cache_key_is_nil_until_set_and_settable_from_python(host):
    host.load("""
        local C = {}
        function C:on_read_request(txn)
            txn.ctx.before = txn.cache_key == nil
            txn:set_cache_key(txn.cache_key and (txn.cache_key .. "+lua") or "lua")
        end
        return C""", name="k.lua")
    txn = hostscript.Transaction()
    host.fire("read_request", txn)
    assert txn.ctx["before"] is True and txn.cache_key == b"lua"
    txn2 = hostscript.Transaction()
    txn2.cache_key = "py"
    host.fire("read_request", txn2)
    assert txn2.ctx["before"] is False and txn2.cache_key == b"py+lua"


def test_set_cache_key_refused_in_log_and_oversize(host):
    host.load("""
        local C = {}
        function C:on_log(txn) txn:set_cache_key("x") end
        function C:on_read_request(txn) txn:set_cache_key(string.rep("k", 65537)) end
        return C""", name="k.lua")
    txn = hostscript.Transaction()
    out = host.fire("log", txn)
    assert out.status is hostscript.Status.ERROR and "not available in hook log" in str(out.error)
    out = host.fire("read_request", txn)
    assert out.status is hostscript.Status.ERROR and "more than 65536" in str(out.error)
    assert txn.cache_key == b""
    with pytest.raises(hostscript.UsageError):
        txn.cache_key = b"k" * 65537
    with pytest.raises(hostscript.ArgumentTypeError):
        txn.cache_key = 5

