"""The Traffic Server plugin in the scenarios it was built for (docs/ats.md): the Key
example on Traffic Server's own cache, reload while serving, a class registered at
run time, the other hooks by name, and hostscript next to ts_lua in one server.
Both engines; a private traffic_server per test (tests/ats_server.py)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# the origin answers with a Key header (match=bennet: the response depends only on
# whether the abc request header holds bennet) and lets the cache keep it
ARTICLE = "/article?cc=max-age%3D60&hdr=Key:abc;match%3Dbennet"


def origin_n(reply) -> int:
    """Which origin request of the path answered (a cache hit repeats an earlier one)."""
    assert reply.status == 200, reply
    return json.loads(reply.body)["n"]


def test_the_key_example_runs_unchanged_on_traffic_servers_cache(start_ats):
    ats = start_ats(scripts=[("key_header.lua", (EXAMPLES / "key_header.lua").read_text())],
                    plugin_args=["--shared", "meta=1m"], cache=True)
    seen = []
    for abc in ("bennet", "bennet", "bennet", "foo, bennet", "theodore", "theodore", "Bennet",
                "bennet"):
        seen.append(origin_n(ats.get(ARTICLE, headers={"abc": abc})))
    # 1: the Key is learnt; that response is not stored (it was looked up before the
    # Key was known, and Traffic Server stores under the key it looked up);
    # 2: stored under bennet's secondary key; then hits for whatever reduces to it
    assert seen == [1, 2, 2, 2, 3, 3, 3, 2], seen


def test_without_the_key_example_the_cache_answers_every_variant_alike(start_ats):
    # the control: the same requests through Traffic Server's cache without the script
    ats = start_ats(scripts=["return {on_log = function() end}"], cache=True)
    seen = [origin_n(ats.get(ARTICLE, headers={"abc": abc})) for abc in ("bennet", "theodore")]
    assert seen == [1, 1]


def test_two_traffic_servers_share_the_key_example_through_redis(start_ats, redis_server,
                                                                 redis_prefix):
    # --shared meta=redis://: what one server learnt (the URL's Key, the generation of
    # each secondary key) the other uses from its first request on, with its own cache
    url = redis_server.url(prefix=redis_prefix)
    key = [("key_header.lua", (EXAMPLES / "key_header.lua").read_text())]
    one = start_ats(scripts=key, plugin_args=["--shared", f"meta={url}"], cache=True)
    two = start_ats(scripts=key, plugin_args=["--shared", f"meta={url}"], cache=True)
    assert [origin_n(one.get(ARTICLE, headers={"abc": "bennet"})) for _ in range(3)] == [1, 2, 2]
    # the second server knows the Key at once: its first response is stored under the
    # generation the first server made, and the variants that reduce to it hit it
    seen = [origin_n(two.get(ARTICLE, headers={"abc": abc}))
            for abc in ("bennet", "bennet", "foo, bennet", "theodore", "theodore")]
    assert seen == [3, 3, 3, 4, 4], seen
    # and the first server files theodore under the generation the second one made
    assert [origin_n(one.get(ARTICLE, headers={"abc": "theodore"})) for _ in range(2)] == [5, 5]
    assert one.died() is None and two.died() is None


WATCHED = """local C = {}
function C:on_send_response(txn) txn.resp.headers["x-version"] = "%s" end
return C
"""


def test_watch_reloads_an_edited_script_and_keeps_it_when_an_edit_is_broken(start_ats):
    ats = start_ats(scripts=[("w.lua", WATCHED % "v1")], plugin_args=["--watch", "0.2"])
    path = ats.scripts["w.lua"]
    assert ats.get("/").get("x-version") == "v1"
    time.sleep(1.1)  # a new modification time (seconds)
    Path(path).write_text(WATCHED % "v2")
    deadline = time.monotonic() + 5
    while ats.get("/").get("x-version") != "v2":
        assert time.monotonic() < deadline, ats.diags()[-2000:]
        time.sleep(0.1)
    time.sleep(1.1)
    Path(path).write_text("return {on_send_response = ")
    ats.wait_diags(r"reloading .*w\.lua failed, keeping the running version", 1, 5)
    for _ in range(4):
        assert ats.get("/").get("x-version") == "v2"


def test_traffic_ctl_plugin_msg_reloads_and_a_broken_script_keeps_the_running_one(start_ats):
    # under traffic_manager, as Traffic Server runs in production: the plugin message
    # reloads every script; a script that no longer compiles leaves the old version on
    ats = start_ats(scripts=[("m.lua", WATCHED % "v1")], manager=True)
    assert ats.get("/m").get("x-version") == "v1"
    path = Path(ats.scripts["m.lua"])

    def reload(expect_log, count):
        done = ats.ats.ctl("plugin", "msg", "hostscript", "reload")
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(ats.wait_diags(expect_log, count, 10)) >= count, ats.diags()[-3000:]

    path.write_text(WATCHED % "v2")
    reload(r"\[hostscript\] reloaded .*m\.lua", 1)
    assert {ats.get(f"/m{i}").get("x-version") for i in range(6)} == {"v2"}
    path.write_text("local C = {\n  broken(\nreturn C\n")
    reload(r"m\.lua:\d+:", 1)
    assert {ats.get(f"/m{i}").get("x-version") for i in range(6)} == {"v2"}
    assert ats.died() is None


def test_reloads_under_load_never_show_half_a_script_or_drop_a_request(start_ats):
    # clients keep both net threads busy while the script is rewritten and reloaded
    # 24 times (every third version broken): every response is whole, from one
    # version of the script, and the last good version is what runs at the end
    import http.client
    import threading
    versioned = """local V = "%s"
        local function check() return V end
        local C = {}
        function C:on_read_request(txn) txn.ctx.seen = check() end
        function C:on_send_response(txn)
          txn.resp.headers["x-version"] = V
          txn.resp.headers["x-check"] = check()
        end
        return C"""
    ats = start_ats(scripts=[("r.lua", versioned % "v0")], manager=True)
    path = Path(ats.scripts["r.lua"])
    stop = threading.Event()
    bad, seen = [], set()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", ats.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/load")
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException) as e:
                bad.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", ats.port, timeout=10)
                continue
            v = r.getheader("x-version")
            if r.status != 200 or not v or r.getheader("x-check") != v:
                bad.append((r.status, r.getheaders()))
            seen.add(v)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        good = "v0"
        for n in range(1, 25):
            if n % 3 == 0:
                path.write_text("local C = {\n  broken(\n")
            else:
                good = f"v{n}"
                path.write_text(versioned % good)
            done = ats.ats.ctl("plugin", "msg", "hostscript", "reload")
            assert done.returncode == 0, done.stdout + done.stderr
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == [], bad[:5]
    assert len(seen) > 3, seen  # the clients saw the reloads happen
    deadline = time.monotonic() + 5
    while ats.get("/final").get("x-version") != good and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ats.get("/final").get("x-version") == good
    assert ats.died() is None


def test_a_class_registered_at_run_time_runs_on_every_net_thread(start_ats):
    ats = start_ats(scripts=[("event_system.lua", (EXAMPLES / "event_system.lua").read_text())])
    before = ats.get("/before")
    assert before.get("x-on_send_response") is None
    ats.get("/trigger", headers={"x-event-system": "on"})
    ats.wait_diags(r"registered .*event_system\.lua#events", 1, 5)
    for i in range(6):  # new connections: both net threads
        r = ats.get(f"/after{i}")
        assert r.get("x-on_send_response"), r
        assert r.get("x-on_read_response"), r
        got = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
        assert got.get("x-on_send_request"), got  # the origin got it


def test_the_other_hooks_by_name_and_an_undeclared_one_refused(start_ats):
    ats = start_ats(scripts=[
        ("hooks.lua", """local C = {}
        function C:on_pre_remap(txn) txn.req.headers["x-pre"] = "1" end
        function C:on_post_remap(txn) txn.req.headers["x-post"] = txn.req.headers["x-pre"] end
        function C:on_txn_start(txn) txn.ctx.started = true end
        function C:on_send_response(txn)
          txn.resp.headers["x-started"] = tostring(txn.ctx.started)
        end
        return C"""),
        ("bad.lua", "return {on_nope = function() end}")])
    r = ats.get("/h")
    got = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
    assert got.get("x-pre") == "1" and got.get("x-post") == "1", got
    assert r.get("x-started") == "true"
    lines = ats.diags_lines(r"bad\.lua.*undeclared hook 'nope'")
    assert lines and "pre_remap" in lines[0], ats.diags()[-2000:]


TSLUA = """function do_global_read_request()
  ts.client_request.header['x-tslua'] = 'yes'
  return 0
end
function do_global_send_response()
  ts.client_response.header['x-tslua-out'] = 'yes'
  return 0
end
"""


def test_next_to_ts_lua_in_one_traffic_server(start_ats, tmp_path):
    tslua = "/usr/lib/trafficserver/modules/tslua.so"
    if not os.path.exists(tslua):
        pytest.skip("tslua.so is not installed")
    script = tmp_path / "tslua_global.lua"
    script.write_text(TSLUA)
    ats = start_ats(scripts=["""local C = {}
        function C:on_read_request(txn)
          txn.req.headers["x-hs"] = txn.req.headers["x-tslua"] or "first"
        end
        function C:on_send_response(txn) txn.resp.headers["x-hs-out"] = hs.engine end
        return C"""], extra_plugins=[f"{tslua} {script}"])
    for i in range(6):
        r = ats.get(f"/both{i}")
        got = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
        assert got.get("x-tslua") == "yes" and got.get("x-hs"), got
        assert r.get("x-tslua-out") == "yes" and r.get("x-hs-out"), r
    assert ats.died() is None


def test_edits_before_any_read_go_straight_into_traffic_servers_message(start_ats):
    # a handler that only writes never has the headers copied in: set replaces every
    # field of the name, add appends, remove drops them all, a read afterwards sees them
    ats = start_ats(scripts=["""local C = {}
        function C:on_send_request(txn)
          local h = txn.req.headers
          h["x-dup"] = "one"
          h:add("x-added", "a1")
          h:add("x-added", "a2")
          h["x-gone"] = nil
          h:remove("x-gone2")
          h["x-list"] = {"l1", "l2"}
          if txn.req.uri:find("read") then h["x-seen"] = h["x-dup"] .. "," .. #h:get_all("x-added") end
        end
        return C"""])
    for path in ("/write", "/write-then-read"):
        r = ats.request("GET", path, headers={"x-gone": "1", "x-gone2": "2"})
        sent = [(k.lower(), v) for k, v in json.loads(r.body)["headers"]]
        got = {}
        for k, v in sent:
            got.setdefault(k, []).append(v)
        assert got.get("x-dup") == ["one"], sent
        assert got.get("x-added") == ["a1", "a2"], sent
        assert "x-gone" not in got and "x-gone2" not in got, sent
        assert got.get("x-list") == ["l1", "l2"], sent
        if "read" in path:
            assert got.get("x-seen") == ["one,2"], sent


def test_one_field_reads_see_traffic_servers_fields_and_the_edits_before_them(start_ats):
    # a read of one name is answered from Traffic Server's message and the edits made
    # so far, without copying the message in; the answers are those of a full copy
    ats = start_ats(scripts=["""local C = {}
        function C:on_read_request(txn)
          local h, got = txn.req.headers, {}
          local function r(n) got[#got + 1] = h[n] or "<nil>" end
          r("x-a"); r("X-DUP"); r("x-none")
          h["x-b"] = "new"; r("x-b")
          h["x-c"] = nil; r("x-c")
          h:add("x-d", "added"); r("x-d")
          h:add("x-e", "more"); r("x-e")
          h:remove("x-f"); h:add("x-f", "after"); r("x-f")
          if txn.req.uri:find("list") then h:each() end
          h["x-got"] = table.concat(got, "|")
        end
        return C"""])
    for path in ("/read", "/read-list"):
        r = ats.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-A: a1\r\nX-Dup: d1\r\nX-Dup: d2\r\n"
                    "X-C: c\r\nX-E: orig\r\nX-F: old\r\nConnection: close\r\n\r\n".encode())
        sent = [(k.lower(), v) for k, v in json.loads(r.split(b"\r\n\r\n", 1)[1])["headers"]]
        got = {}
        for k, v in sent:
            got.setdefault(k, []).append(v)
        assert got.get("x-got") == ["a1|d1|<nil>|new|<nil>|added|orig|after"], sent
        assert got.get("x-e") == ["orig", "more"] and got.get("x-f") == ["after"], sent
        assert "x-c" not in got and got.get("x-d") == ["added"], sent


def test_a_name_with_nul_bytes_cannot_forge_journal_records(start_ats):
    # h:remove of a name no field can have is nothing; before, a NUL in it split the
    # journal's records and the bytes after it became edits nobody had checked
    ats = start_ats(scripts=["""return {on_read_request = function(self, txn)
          local h = txn.req.headers
          h:remove("x\\0\\0aX-A\\0v\\r\\nInjected: yes\\0r")
          h:remove(("a"):rep(60) .. "\\0")
          h:add("x-after", "ok")
          h["x-read"] = h["x-after"] or "nil"
        end}"""])
    for i in range(4):
        r = ats.get(f"/nul{i}")
        sent = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
        assert "injected" not in sent and "x-a" not in sent, sent
        assert sent.get("x-after") == "ok" and sent.get("x-read") == "ok", sent
    assert ats.died() is None


def test_a_header_sent_twice_is_replaced_whole(start_ats):
    ats = start_ats(scripts=["""return {on_read_request = function(self, txn)
          txn.req.headers["x-dup"] = "only"
        end}"""])
    r = ats.raw(b"GET /dup HTTP/1.1\r\nHost: x\r\nX-Dup: a\r\nX-Dup: b\r\nConnection: close\r\n\r\n")
    body = r.split(b"\r\n\r\n", 1)[1]
    sent = [(k.lower(), v) for k, v in json.loads(body)["headers"]]
    assert [v for k, v in sent if k == "x-dup"] == ["only"], sent


def test_edits_journaled_before_any_read_count_against_the_memory_limit(start_ats):
    # a write-only handler adding fields in a loop grows the core's journal, outside
    # the Lua heap: the memory limit stops it, and the server goes on serving
    ats = start_ats(scripts=["""return {on_send_request = function(self, txn)
          if txn.req.uri:find("bomb") then
            local h, v = txn.req.headers, string.rep("v", 4000)
            for i = 1, 1e6 do h:add("x-bomb", v) end
          end
          txn.req.headers["x-ok"] = "1"
        end}"""], plugin_args=["--memory-limit", "8m", "--time-limit", "2"])
    r = ats.get("/bomb")
    assert r.status == 200
    assert "x-bomb" not in json.loads(r.body)["headers"].__repr__().lower()
    ats.wait_diags(r"in send_request: .*memory limit exceeded", 1, 5)
    after = ats.get("/after")
    got = dict((k.lower(), v) for k, v in json.loads(after.body)["headers"])
    assert got.get("x-ok") == "1"
