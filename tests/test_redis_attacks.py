"""Attacks on the Redis client of the core (redis.c, shared_redis.c, lapi_redis.c):
what a hostile handler script, or a hostile or broken server, can do to the
process, to the pooled connections and to the Redis server they share.

Each finding of the review is a test, with a comment naming the bug it found (all
fixed since). The other tests record what was attacked and held (hostile replies, URL parsing, value encoding, key escaping, integer
edges, concurrency). Memory measurements and possibly endless loops run in a
subprocess; a FakeRedis below answers with hostile bytes."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from urllib.parse import quote

import pytest
from helpers import ROOT, Heartbeat
from redis_server import REDIS_SERVER
from test_shared import lua, lua_error, lua_typed

import hostscript
from hostscript import Status, Transaction

FAST = {"timeout": 0.2, "connect_timeout": 0.2}


# ---- a hostile Redis: a socket server on loopback that answers as told ----


def parse_commands(buf: bytes):
    """The complete RESP commands at the start of BUF, and what is left."""
    out = []
    while buf.startswith(b"*"):
        end = buf.find(b"\r\n")
        if end < 0:
            break
        n, pos, args = int(buf[1:end]), end + 2, []
        for _ in range(n):
            e = buf.find(b"\r\n", pos)
            if e < 0:
                return out, buf
            ln = int(buf[pos + 1:e])
            if len(buf) < e + 2 + ln + 2:
                return out, buf
            args.append(buf[e + 2:e + 2 + ln])
            pos = e + 2 + ln + 2
        out.append(args)
        buf = buf[pos:]
    return out, buf


def good(cmd):
    """A well-behaved server's reply to CMD (an empty database)."""
    name = cmd[0].upper()
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"GET":
        return b"$-1\r\n"
    if name == b"SCAN":
        return b"*2\r\n$1\r\n0\r\n*0\r\n"
    if name in (b"DEL", b"UNLINK", b"EXISTS"):
        return b":0\r\n"
    return b"+OK\r\n"


CLOSE = object()


class FakeRedis:
    """ANSWER(conn_number, command, socket) -> bytes to send, None (it sent them
    itself), or CLOSE; connections are numbered from 1 in accept order."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.commands = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c, self.accepted), daemon=True).start()

    def _serve(self, c, n):
        buf = b""
        try:
            while not self.stopped.is_set():
                data = c.recv(1 << 16)
                if not data:
                    return
                buf += data
                cmds, buf = parse_commands(buf)
                for cmd in cmds:
                    self.commands.append((n, cmd))
                    out = self.answer(n, cmd, c)
                    if out is CLOSE:
                        return
                    if out:
                        c.sendall(out)
        except OSError:
            pass
        finally:
            c.close()

    def url(self, **opts):
        q = "&".join(f"{k}={v}" for k, v in opts.items())
        return f"redis://127.0.0.1:{self.port}/0" + ("?" + q if q else "")

    def close(self):
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def fake():
    made = []

    def make(answer):
        f = FakeRedis(answer)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def first_connection(reply, then_close=False):
    """An answer: REPLY (bytes) to every command of connection 1, good replies after."""
    def answer(n, cmd, sock):
        if n > 1:
            return good(cmd)
        if then_close:
            sock.sendall(reply)
            return CLOSE
        return reply
    return answer


def run_python(code: str, timeout: float = 30):
    """Run CODE in a fresh interpreter with the repository importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def fire_ctx(host, source):
    """Load SOURCE (a handler of read_request) and fire it: (outcome, txn.ctx)."""
    host.load(source, name="attack.lua")
    txn = Transaction()
    out = host.fire("read_request", txn)
    return out, txn.ctx


# =====================================================================================
# Findings (each fixed; the comment says what the test found)
# =====================================================================================

# ---- 1. SCRIPT DEBUG: a handler puts a pooled connection into the Lua debugger ----

# Guards against: lapi_redis.c: SCRIPT is not refused; SCRIPT DEBUG YES|SYNC turns the pooled
# connection into a debugger session (its next EVAL enters the debugger, and every later
# command on it is answered by the debugger); in SYNC mode the whole Redis server blocks while
# that connection sits idle in the pool
def test_script_debug_cannot_desync_the_pooled_connection(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.5)})
    out, ctx = fire_ctx(host, """
        local C = {}
        function C:on_read_request(txn)
            local r = hs.redis("meta")
            txn.ctx.debug = (pcall(r.call, r, "SCRIPT", "DEBUG", "YES"))
            txn.ctx.eval = r:call("EVAL", "return 7", 0)   -- the same pooled connection
        end
        return C""")
    assert out.status is Status.CONTINUE, out.error
    d = host.shared["meta"]
    # the dictionary's next calls take that connection from the pool: they must still be
    # answered by Redis, not by a debugger session
    d.set("k", 1)
    assert own_redis.cmd("GET", "t:k") == b"1"
    assert d.incr("n", 1, init=0) == 1
    assert ctx == {"debug": False, "eval": 7}


# Guards against: lapi_redis.c: SCRIPT is not refused; SCRIPT DEBUG YES|SYNC turns the pooled
# connection into a debugger session (its next EVAL enters the debugger, and every later
# command on it is answered by the debugger); in SYNC mode the whole Redis server blocks while
# that connection sits idle in the pool
def test_script_debug_sync_cannot_freeze_the_redis_server(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.5)})
    fire_ctx(host, """
        local C = {}
        function C:on_read_request(txn)
            local r = hs.redis("meta")
            pcall(r.call, r, "SCRIPT", "DEBUG", "SYNC")
            r:call("EVAL", "return 1", 0)
        end
        return C""")
    # another client of the same Redis (another process): the server must answer it
    assert own_redis.cmd("PING", timeout=1) == b"PONG"


# ---- 2. a reply line without its end: quadratic parsing past every deadline ----


# Guards against: redis.c read_replies: the deadline is only checked when recv() would block,
# and hiredis 0.14 re-scans the whole unfinished line (status, error, integer, header) after
# every 16 KiB chunk: a 12 MB line takes seconds of CPU with timeout=0.2 (a handler gets the
# same from a real Redis with EVAL "return {ok=string.rep('x', 24e6)}": 14 s with
# time_limit=1)
def test_a_reply_line_that_never_ends_is_bounded_by_the_timeout(fake):
    srv = fake(first_connection(b"+" + b"x" * (12 << 20)))
    host = hostscript.Host(["read_request"], shared={"d": srv.url(timeout=0.2)})
    try:
        d = host.shared["d"]
        t0 = time.monotonic()
        with pytest.raises(hostscript.SharedDictError, match="redis: "):
            d.get("k")
        took = time.monotonic() - t0
        assert took < 0.7, f"a 0.2 s round trip took {took:.2f} s"
    finally:
        host.close()


# ---- 3. reply objects: max_reply bounds the bytes read, not the memory they become ----


# Guards against: redis.c: max_reply bounds the bytes read, but every 4-byte element
# (':1\r\n') of an array becomes a malloc'd redisReply (~64 bytes) plus 8 bytes of element
# vector, outside the Lua allocator: 12 MB read -> ~200 MB of C memory, whatever the memory
# limit
def test_a_big_array_reply_does_not_bloat_memory_outside_lua(own_redis, engine):
    proc = run_python(f"""
        import resource
        import hostscript
        from hostscript import Transaction
        max_reply = 16 << 20
        host = hostscript.Host(["read_request"], engine="{engine}", memory_limit=4 << 20,
            shared={{"d": "redis://127.0.0.1:{own_redis.port}/0?prefix=t:&timeout=20"
                          "&max_reply=%d" % max_reply}})
        host.load('''local C = {{}} function C:on_read_request(txn)
            local r = hs.redis("d")
            local v, err = r:call("EVAL", "local t = {{}} for i = 1, 2500000 do t[i] = 1 end return t", 0)
            txn.ctx.err = err
        end return C''', name="x.lua")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        txn = Transaction()
        out = host.fire("read_request", txn)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
        # the reply (10 MB) was read and making it a Lua table passed the memory limit, or
        # the client refused it: anything else (a Redis failure) proves nothing
        assert (out.error and "memory limit" in out.error.message
                or txn.ctx.get("err") == "redis: reply too large"), (out, txn.ctx)
        print(grew, max_reply)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew, max_reply = map(int, proc.stdout.split())
    assert grew < 4 * max_reply, f"peak RSS grew by {grew >> 20} MiB for a reply under 10 MiB"


# ---- 4. a get that ran out of Lua memory leaves a stale value for the thread ----


# Guards against: shared_redis.c r_get: a value too long for the caller's buffer is kept
# (tl_kept) for the retry, but when the retry never comes (lua_newuserdata raised the memory
# limit in lapi_shared.c l_get) it stays: the thread's next get of that key returns it without
# a round trip, after any set/delete, even from Python — and holds the bytes outside Lua
def test_a_get_that_hit_the_memory_limit_leaves_no_stale_value(make_host, redis_server,
                                                               redis_prefix):
    host = make_host(memory_limit=1 << 20, shared={"meta": redis_server.url(prefix=redis_prefix)})
    d = host.shared["meta"]
    d.set("big", b"old" * (1 << 20))  # 3 MiB: more than the state may hold
    out, _ = fire_ctx(host, """
        local C = {}
        function C:on_read_request(txn) hs.shared.meta:get("big") end
        return C""")
    assert out.status is Status.ERROR and "memory" in out.error.message
    d.set("big", b"new")
    assert redis_server.cmd("GET", redis_prefix + "big") == b"\0s0:new"
    assert d.get("big") == b"new"
    d.delete("big")
    assert d.get("big") is None


# ---- 5. idle pooled connections keep the reader buffer of their largest reply ----


# Guards against: redis.c: hiredis keeps its reader buffer at its peak size until the next
# feed on that connection; a connection given back to the pool after a big reply holds it (up
# to max_reply, 64 MiB by default, times 64 idle connections)
def test_an_idle_connection_does_not_keep_a_big_reply_buffer(redis_server, redis_prefix):
    redis_server.cmd("SET", redis_prefix + "big", b"x" * (40 << 20))
    proc = run_python(f"""
        import gc
        import hostscript
        from helpers import rss_bytes
        host = hostscript.Host(["read_request"],
            shared={{"d": "redis://127.0.0.1:{redis_server.port}/0?prefix={redis_prefix}&timeout=10"}})
        d = host.shared["d"]
        d.get("nothing")
        before = rss_bytes()
        v = d.get("big")
        assert len(v) == 40 << 20
        del v
        gc.collect()
        print(rss_bytes() - before)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = int(proc.stdout)
    assert kept < 16 << 20, f"{kept >> 20} MiB kept after the reply was consumed"


# ---- 6. a command that fails to format keeps its C buffer for the thread's life ----


# Guards against: lapi_redis.c l_call: format_args copies the arguments into the thread's
# tl_cmd before raising on a bad argument (or on max_reply); the raise skips the KEEP_BUF
# trim, so the thread keeps up to max_reply + one argument of C memory — after host.close()
# too
def test_a_command_that_fails_to_format_does_not_keep_its_buffer(redis_server, redis_prefix,
                                                                  engine):
    proc = run_python(f"""
        import gc
        import hostscript
        from hostscript import Transaction
        from helpers import rss_bytes
        host = hostscript.Host(["read_request"], engine="{engine}", memory_limit=40 << 20,
            shared={{"d": "redis://127.0.0.1:{redis_server.port}/0?prefix={redis_prefix}"}})
        host.load('''local C = {{}} function C:on_read_request(txn)
            local r = hs.redis("d")
            local s = string.rep("x", 10 * 1024 * 1024)   -- 10 MiB in Lua, 60 MiB in C
            txn.ctx.err = select(2, pcall(r.call, r, "SET", s, s, s, s, s, s, {{}}))
        end return C''', name="x.lua")
        before = rss_bytes()
        txn = Transaction()
        host.fire("read_request", txn)
        assert "bad argument #8" in txn.ctx["err"], txn.ctx
        host.close()
        gc.collect()
        print(rss_bytes() - before)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = int(proc.stdout)
    assert kept < 16 << 20, f"{kept >> 20} MiB of C memory kept after the call failed"


# ---- 7. a fire past its deadline puts the whole endpoint into back-off ----


# Guards against: redis.c connect_new/take: a connection attempt that fails because the
# *caller's* fire deadline has passed (d <= now, or the budget cut by hs_wait_deadline_ns) is
# counted as the endpoint failing: back-off starts (doubling to 1 s) and every other thread's
# call fails at once with 'timeout (reconnecting)'
def test_a_fire_out_of_time_does_not_put_the_endpoint_into_back_off(make_host, redis_server,
                                                                      redis_prefix):
    host = make_host(time_limit=0.3, shared={"meta": redis_server.url(prefix=redis_prefix,
                                                                       timeout=1)})
    out, ctx = fire_ctx(host, """
        local C = {}
        function C:on_read_request(txn)
            local r = hs.redis("meta")
            -- waits until the fire's deadline: times out, its connection is closed
            local _, e1 = r:call("BLPOP", r.prefix .. "nothing", 0)
            local _, e2 = r:call("PING")  -- no time left: no connection can be made
            txn.ctx.e = {e1, e2}
        end
        return C""")
    assert out.status is Status.CONTINUE, out.error
    assert ctx["e"] == ["redis: timeout", "redis: timeout"]
    # Redis is fine: another caller (without that fire's deadline) must get through
    assert host.shared["meta"].get("k") is None


# ---- 8. the GIL is held while a state being (re)built waits on Redis ----


# Guards against: dispatch.c hs_fire: release_at_ns is set in run_handlers, after
# hs_state_rehydrate (and after a new thread's state is built), so hs_state_before_wait cannot
# release the GIL while a script's top-level chunk or new() waits on Redis: other Python
# threads stop for up to the URL's timeout
@pytest.mark.parametrize("when", ["after a load", "on a new thread"])
def test_a_chunk_waiting_on_redis_does_not_hold_the_gil(make_host, own_redis, when):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.5, connect_timeout=0.5)})
    d = host.shared["meta"]
    d.set("k", 1)
    src = """local warm = hs.shared.meta:get("k")   -- at the top level: run on each state
    local C = {} function C:on_read_request(txn) txn.ctx.warm = warm or false end return C"""
    host.load(src, name="warm.lua")
    host.fire("read_request", Transaction())  # this thread's state is built
    own_redis.pause()
    try:
        with Heartbeat() as beat:
            time.sleep(0.05)
            if when == "after a load":
                host.load(src, name="warm.lua")  # a new generation: rebuilt by the next fire
                host.fire("read_request", Transaction())
            else:
                t = threading.Thread(target=host.fire, args=("read_request", Transaction()))
                t.start()
                t.join()
    finally:
        own_redis.resume()
    assert beat.max_gap < 0.2, f"the heartbeat stalled {beat.max_gap:.3f} s"


# ---- 9. incr on an integer stored with flags: silently wrong beyond 2^53 ----


# Guards against: shared_redis.c incr_script: a tagged integer is added in doubles and only
# the *result* is checked against 2^53; operands beyond 2^53 are rounded first: (-2^60+1) +
# 2^60 = 0, stored and returned as exact (docs: refused beyond 2^53)
def test_incr_on_a_flagged_integer_beyond_2_53_is_refused_not_rounded(make_host, redis_server,
                                                                       redis_prefix):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    d.set("k", -(2 ** 60) + 1, flags=1)
    try:
        got = d.incr("k", 2 ** 60)
    except hostscript.SharedDictError as exc:
        assert "overflow" in exc.message
    else:
        assert got == 1
    assert d.get_with_flags("k") in ((-(2 ** 60) + 1, 1), (1, 1))


# ---- 10. a dictionary whose name extends another's: keys and flush_all cross over ----


# Guards against: shared_redis.c r_open: the default prefix 'hs:NAME:' does not escape ':' in
# NAME, so dictionary 'a' (hs:a:) is a prefix of dictionary 'a:b' (hs:a:b:): a's get_keys
# lists b's keys and a's flush_all deletes them
def test_dictionary_names_with_colons_do_not_share_keys(make_host, redis_server, engine):
    tag = f"x{os.getpid()}{engine}"
    host = make_host(shared={tag: redis_server.url(), f"{tag}:b": redis_server.url()})
    a, b = host.shared[tag], host.shared[f"{tag}:b"]
    try:
        b.set("k", "v")
        assert a.keys() == []
        a.flush_all()
        assert b.get("k") == b"v"
    finally:
        b.flush_all()


# ---- 11. NUL bytes in the URL's parts ----


# Guards against: redis.c hs_redis_open keeps NUL bytes decoded from %00, then uses strlen: in
# the prefix, shared_redis.c match_pattern's SCAN MATCH is cut at the NUL (prefix 'x\0'
# matches the foreign key 'x', which flush_all deletes, while get_keys misses the dictionary's
# own keys); in the password, AUTH gets the bytes before the NUL
@pytest.mark.parametrize("part", ["prefix", "password"])
def test_nul_bytes_in_the_url_are_refused_or_kept_whole(make_host, own_redis, part):
    if part == "password":
        own_redis.cmd("CONFIG", "SET", "requirepass", "a")
        own_redis.password = "a"
        try:
            host = make_host(shared={"meta": own_redis.url(prefix="t:", password="a\0b")})
        except hostscript.UsageError:
            return  # refused: fine
        with pytest.raises(hostscript.SharedDictError):  # "a\0b" is not the password "a"
            host.shared["meta"].set("k", 1)
        return
    own_redis.cmd("SET", "x", "foreign")
    try:
        host = make_host(shared={"meta": own_redis.url(prefix="x%00")})
    except hostscript.UsageError:
        return
    d = host.shared["meta"]
    d.set("k", 1)
    assert d.keys() == ["k"]
    d.flush_all()
    assert own_redis.cmd("GET", "x") == b"foreign" and own_redis.cmd("EXISTS", b"x\0k") == 0


# ---- 12. the password shows in error messages ----


# Guards against: redis.c hs_redis_open prints the whole URL, password included, in every
# UsageError ('%.200s'), and splits user info at the *first* '@' so an unencoded '@' in a
# password puts the rest of it into the host name, which connection errors print
@pytest.mark.parametrize("url", [
    "redis://:s3cret@127.0.0.1:99999/0",
    "redis://user:s3cret@127.0.0.1:6379/0?bogus=1",
    "redis://:ab@s3cret@127.0.0.1:1/0?connect_timeout=0.2",
])
def test_the_password_is_not_in_error_messages(url):
    try:
        host = hostscript.Host(["read_request"], shared={"meta": url})
    except hostscript.UsageError as exc:
        message = str(exc)
    else:
        try:
            with pytest.raises(hostscript.SharedDictError) as exc:
                host.shared["meta"].get("k")
            message = str(exc.value)
        finally:
            host.close()
    assert "s3cret" not in message, message


# ---- 13. LuaJIT: integers are stored as tagged doubles ----


def test_integers_from_lua_are_stored_as_digits(request, make_host, redis_server, redis_prefix,
                                                 engine):
    # Guards against: lapi_shared.c get_value/get_number on LuaJIT (hs_isinteger is 0): every
    # number is HS_VAL_NUMBER, so d:set('c', 5) stores '\0n0:5' and d:incr stores doubles:
    # INCRBY from other clients fails, Python reads 5.0 (docs: an integer is stored as its
    # digits). A design decision: the in-process tests expect LuaJIT numbers to be floats; if
    # that stays, delete this test and say so in docs/redis.md
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)})
    lua(host, 'd:set("c", 5) d:incr("i", 1, 0) return true')
    assert redis_server.cmd("GET", redis_prefix + "c") == b"5"
    assert redis_server.cmd("GET", redis_prefix + "i") == b"1"
    assert redis_server.cmd("INCRBY", redis_prefix + "i", 1) == 2
    got = host.shared["meta"].get("c")
    assert got == 5 and type(got) is int


# ---- 14. LuaJIT: hs.redis rounds integers beyond 2^53 silently ----


def test_hs_redis_integers_beyond_2_53_are_not_rounded(request, make_host, redis_server,
                                                        redis_prefix, engine):
    # Guards against: lapi_redis.c push_reply on LuaJIT: an integer reply is lua_pushnumber'd,
    # so 9007199254740993 comes back as 9007199254740992 (the dictionary refuses such values
    # with a message instead)
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)})
    got = lua(host, """
        local r = hs.redis("meta")
        r:call("SET", r.prefix .. "n", "9007199254740993")
        local v, err = r:call("INCRBY", r.prefix .. "n", 0)
        return tostring(v), err""")
    # exact (an integer, or its digits as a string), or refused with a message
    assert got[0] == b"9007199254740993" or (got[0] == b"nil" and got[1]), got


# ---- 15. the deny list: commands that change other connections or the server ----


@pytest.mark.parametrize("command,args", [
    ("SWAPDB", "0, 1"),         # what SELECT is refused for, for every client at once
    ("REPLCONF", '"ACK", 0'),   # an internal command with no reply: the call hangs
    ("MIGRATE", '"127.0.0.1", 1, "k", 0, 100'),  # the server connects where it is told
])
# Guards against: lapi_redis.c refused[]: SWAPDB (swaps the databases under every pooled
# connection), REPLCONF (internal; ACK/GETACK send no reply), MIGRATE (server-side connections
# to any host) are not refused
def test_more_server_changing_commands_are_refused(make_host, own_redis, command, args):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.3)})
    assert "not allowed" in lua_error(host, f'hs.redis("meta"):call("{command}", {args})')


# ---- 16. a server whose SCAN never ends: get_keys/keys() never return ----


# Guards against: shared_redis.c scan: the SCAN loop has no bound of its own; each round trip
# is bounded, but a server answering cursor '1' forever keeps keys()/flush_all() (Python, or
# C, without a fire deadline) looping forever
def test_a_scan_that_never_ends_is_bounded(fake):
    def answer(n, cmd, sock):
        return b"*2\r\n$1\r\n1\r\n*0\r\n" if cmd[0].upper() == b"SCAN" else good(cmd)

    srv = fake(answer)
    try:
        proc = run_python(f"""
            import hostscript
            host = hostscript.Host(["read_request"], shared={{"d": "{srv.url(timeout=0.2)}"}})
            try:
                host.shared["d"].keys()
            except hostscript.SharedDictError as exc:
                print(exc.message)
        """, timeout=6)
    except subprocess.TimeoutExpired:
        pytest.fail("keys() still looping after 6 s with timeout=0.2")
    assert proc.stdout.startswith("redis: "), (proc.stdout, proc.stderr[-2000:])


# ---- 17. timeouts too small to mean anything ----


# Guards against: redis.c parse_seconds: any s > 0 is accepted, but s * 1e9 truncates to 0 ns
# below 1e-9 (and to a few ns just above): every call then fails with 'timeout' and a 0
# connect_timeout keeps the endpoint in back-off forever
@pytest.mark.parametrize("option", ["timeout", "connect_timeout"])
def test_a_timeout_below_a_millisecond_is_refused(option):
    with pytest.raises(hostscript.UsageError, match=option):
        hostscript.Host(["read_request"], shared={"meta": f"redis://127.0.0.1/0?{option}=1e-300"})


# =====================================================================================
# What held
# =====================================================================================

# ---- hostile replies: each fails its call fast, the next call works ----

HOSTILE = {
    "a huge array header": (b"*2147483647\r\n", "reply too large"),
    "an array beyond INT_MAX": (b"*2147483648\r\n", "protocol error"),
    "a negative array length": (b"*-2\r\n", "protocol error"),
    "a bulk length beyond max_reply, no data": (b"$99999999999\r\n", "timeout"),
    "a never-ending bulk": (b"$99999999\r\n" + b"x" * 200_000, "reply too large"),
    "a negative bulk length": (b"$-2\r\n", "protocol error"),
    "more replies than commands": (b"$-1\r\n+EXTRA\r\n", "more replies than commands"),
    "garbage": (b"!garbage\r\n", "protocol error"),
    "nesting deeper than hiredis allows": (b"*1\r\n" * 9 + b":1\r\n", "protocol error"),
    "an integer beyond 64 bits": (b":99999999999999999999\r\n", "protocol error"),
    "a RESP3 map on a RESP2 connection": (b"%1\r\n+a\r\n+b\r\n", "protocol error"),
    "a partial reply, then silence": (b"$10\r\nabc", "timeout"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_replies_fail_the_call_and_drop_the_connection(fake, name):
    reply, reason = HOSTILE[name]
    srv = fake(first_connection(reply))
    host = hostscript.Host(["read_request"], shared={"d": srv.url(timeout=0.2, max_reply=65536)})
    try:
        d = host.shared["d"]
        t0 = time.monotonic()
        with pytest.raises(hostscript.SharedDictError, match=reason):
            d.get("k")
        assert time.monotonic() - t0 < 0.5
        assert d.get("k") is None and srv.accepted == 2  # a new connection, in step
    finally:
        host.close()


def test_a_connection_closed_mid_reply(fake):
    srv = fake(first_connection(b"$10\r\nabc", then_close=True))
    host = hostscript.Host(["read_request"], shared={"d": srv.url(**FAST)})
    try:
        d = host.shared["d"]
        with pytest.raises(hostscript.SharedDictError, match="closed by the server"):
            d.get("k")
        assert d.get("k") is None and srv.accepted == 2
    finally:
        host.close()


def test_a_reply_trickling_byte_by_byte_is_bounded_by_the_timeout(fake):
    def answer(n, cmd, sock):
        if n > 1:
            return good(cmd)
        for b in b"$3\r\nabc\r\n":
            sock.sendall(bytes([b]))
            time.sleep(0.05)
        return None

    srv = fake(answer)
    host = hostscript.Host(["read_request"], shared={"d": srv.url(timeout=0.2)})
    try:
        t0 = time.monotonic()
        with pytest.raises(hostscript.SharedDictError, match="timeout"):
            host.shared["d"].get("k")
        assert time.monotonic() - t0 < 0.4  # not the 0.45 s the whole reply takes
    finally:
        host.close()


def test_a_late_extra_reply_is_not_taken_by_the_next_call(fake):
    def answer(n, cmd, sock):
        if n == 1 and cmd[0].upper() == b"GET":
            sock.sendall(b"$-1\r\n")
            time.sleep(0.05)
            sock.sendall(b"$5\r\nEVIL!\r\n")  # after the call returned
            return None
        return good(cmd)

    srv = fake(answer)
    host = hostscript.Host(["read_request"], shared={"d": srv.url(**FAST)})
    try:
        d = host.shared["d"]
        assert d.get("k") is None
        time.sleep(0.15)
        assert d.get("k") is None  # not b"EVIL!": the idle connection was seen to be unclean
        assert srv.accepted == 2
    finally:
        host.close()


def test_hostile_replies_through_hs_redis(fake, make_host):
    srv = fake(first_connection(b"*3\r\n:1\r\n*2\r\n$-1\r\n-ERR x\r\n*-1\r\n"))
    host = make_host(shared={"meta": srv.url(**FAST)})
    got = lua_typed(host, """
        local v = hs.redis("meta"):call("PING")
        return v[1], v[2][1], v[2][2].err, v[3]""")
    assert [v for _, v in got] == [1, False, b"ERR x", False]


# ---- the deny list cannot be dodged, and EVAL cannot change the connection ----


@pytest.mark.parametrize("spelling", ["sElEcT", "SELECT\\0", " SELECT", "SELECT "])
def test_refused_commands_cannot_be_respelled(rhost, spelling):
    got = lua(rhost, f"""
        local r = hs.redis("meta")
        local ok, v, err = pcall(r.call, r, "{spelling}", 1)
        return ok, v, err""")
    if got[0] is False:  # refused here
        assert b"not allowed" in got[1]
    else:  # or unknown to Redis
        assert got[1] is None and got[2].startswith(b"ERR unknown command")
    assert got != [True, b"OK", None]


def test_select_inside_a_script_does_not_change_the_pooled_connection(rhost, redis_server,
                                                                       redis_prefix):
    got = lua(rhost, """
        local r = hs.redis("meta")
        local k = r.prefix .. "sel"
        r:call("EVAL", "redis.call('SELECT', 9) return redis.call('SET', KEYS[1], 'in9')", 1, k)
        r:call("SET", k .. "0", "in0")
        return r:call("GET", k), r:call("GET", k .. "0")""")
    assert got == [None, b"in0"]
    assert redis_server.cmd("GET", redis_prefix + "sel", db=9) == b"in9"
    assert redis_server.cmd("GET", redis_prefix + "sel0") == b"in0"
    redis_server.cmd("DEL", redis_prefix + "sel", db=9)


def test_incr_survives_script_flush(rhost, redis_server, redis_prefix):
    got = lua(rhost, """
        local r = hs.redis("meta")
        local a = d:incr("n", 1, 0)
        r:call("SCRIPT", "FLUSH")    -- the server forgets its scripts: incr sends its own
        local b = d:incr("n", 1, 0)
        return a, b, (d:incr("n", 1))""")
    assert got == [1, 2, 3]


# ---- URLs ----


@pytest.mark.parametrize("url", [
    "redis://", "redis://:6379", "redis://h:0", "redis://h:65536", "redis://h:", "redis://h:12a",
    "redis://h:6379:1", "redis://[::1", "redis://[::1]x", "redis://[]:1", "redis://::1:6379",
    "redis://h/abc", "redis://h/99999999999", "redis://h/0/1", "redis://h/0?prefix",
    "redis://h/0?prefix=", "redis://h/0?x=1", "redis://h/0?&", "redis://h/0?=v",
    "redis://h/0?timeout=0", "redis://h/0?timeout=-1", "redis://h/0?timeout=nan",
    "redis://h/0?timeout=inf", "redis://h/0?timeout=3601", "redis://h/0?max_reply=1023",
    "redis://h/0?max_reply=99999999999999999999", "redis://h/0#f", "redis://h/0?prefix=a#f",
    "redis://u@h", "redis://:%zz@h", "redis://:%4@h", "redis://h/0?prefix=%4", "REDIS://h",
    "rediss://h", "redis://h/0?prefix=a&prefix=", "redis://h/0?timeout=1" + "0" * 40,
])
def test_bad_urls_are_usage_errors(url):
    with pytest.raises(hostscript.UsageError):
        hostscript.Host(["read_request"], shared={"meta": url})


@pytest.mark.parametrize("url", [
    "redis://[::1]:6379", "redis://h", "redis://h/", "redis://h?prefix=p", "redis://h/0?",
    "redis://h/0?prefix=a&", "redis://:p%40ss@h", "redis://h/0?timeout=0x1p-2",
    "redis://" + "h" * 5000 + "/0", "redis://h/0?prefix=" + "%2A" * 3000,
])
def test_odd_but_valid_urls_are_accepted_without_connecting(url):
    hostscript.Host(["read_request"], shared={"meta": url}).close()


def test_ipv6_literals_connect():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        port = s.getsockname()[1]
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "::1", "--save", "",
                             "--appendonly", "no", "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = None
    try:
        host = hostscript.Host(["read_request"],
                               shared={"meta": f"redis://[::1]:{port}/0?prefix=t:"})
        d = host.shared["meta"]
        for _ in range(200):  # until it listens
            try:
                d.set("k", "v")
                break
            except hostscript.SharedDictError:
                time.sleep(0.025)
        assert d.get("k") == b"v"
    finally:
        if host:
            host.close()
        proc.kill()
        proc.wait()


def test_passwords_with_url_characters_and_acl_users(make_host, own_redis):
    secret = "p@ss:w/rd?#%&= x"  # everything a URL means, percent-encoded
    own_redis.cmd("ACL", "SETUSER", "hs", "on", ">" + secret, "~*", "+@all")
    own_redis.cmd("CONFIG", "SET", "requirepass", secret)
    own_redis.password = secret
    plain = make_host(shared={"meta": own_redis.url(prefix="t:", password=secret)})
    user = make_host(shared={"meta": own_redis.url(prefix="u:", password=secret, user="hs")})
    wrong = make_host(shared={"meta": own_redis.url(prefix="t:", password="nope", **FAST)})
    plain.shared["meta"].set("k", 1)
    user.shared["meta"].set("k", 2)
    assert own_redis.cmd("GET", "t:k") == b"1" and own_redis.cmd("GET", "u:k") == b"2"
    with pytest.raises(hostscript.SharedDictError, match="redis: .*(WRONGPASS|invalid)"):
        wrong.shared["meta"].get("k")
    assert quote(secret, safe="") in own_redis.url(password=secret)


# ---- values, keys and prefixes ----

VALUES = [b"", b"a\0b\r\nc", b"\0s0:x", b"\0i0:5", b"5", True, False, 0, -1, 2 ** 63 - 1,
          -(2 ** 63), 0.1, -0.0, 1e308, 5e-324, math.inf, -math.inf, 5.0]


def test_every_value_type_and_flags_round_trips(make_host, redis_server, redis_prefix):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    key = b"k\0\r\n*?[]"
    for v in VALUES:
        for flags in (0, 1, 2 ** 32 - 1):
            d.set(key, v, flags=flags)
            got = d.get_with_flags(key)
            assert got == (v, flags) and type(got[0]) is type(v), (v, flags, got)
            if isinstance(v, float) and v == 0:
                assert math.copysign(1, got[0]) == math.copysign(1, v)
    d.set(key, math.nan)
    assert math.isnan(d.get(key))
    assert d.keys() == [key.decode("utf-8", "surrogateescape")]


@pytest.mark.parametrize("raw,value", [
    (b" 5", b" 5"), (b"+5", b"+5"), (b"-0", b"-0"), (b"007", b"007"),
    (b"99999999999999999999", b"99999999999999999999"),
    (b"9223372036854775807", 2 ** 63 - 1), (b"-9223372036854775808", -(2 ** 63)),
    (b"9223372036854775808", b"9223372036854775808"), (b"\0n0:abc", b"\0n0:abc"),
    (b"\0b0:2", b"\0b0:2"), (b"\0s", b"\0s"), (b"\0i99999999999:1", b"\0i99999999999:1"),
])
def test_foreign_values_read_as_integers_only_when_canonical(make_host, redis_server,
                                                             redis_prefix, raw, value):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    redis_server.cmd("SET", redis_prefix + "f", raw)
    assert d.get("f") == value
    if isinstance(value, bytes) and raw[:1] != b"\0":  # incr agrees with get
        with pytest.raises(hostscript.SharedDictError, match="not a number"):
            d.incr("f", 1)


def test_glob_characters_in_the_prefix_are_escaped(make_host, redis_server):
    tag = f"g{os.getpid()}"
    prefix = f"{tag}*?[a-z]\\^-:"
    neighbours = [f"{tag}X?[a-z]\\^-:k", f"{tag}*?a\\^-:k", f"{tag}*?[a-z]^-:k", f"{tag}*?[a-z]\\^-"]
    for k in neighbours:
        redis_server.cmd("SET", k, "other")
    d = make_host(shared={"meta": redis_server.url(prefix=quote(prefix, safe=""))}).shared["meta"]
    try:
        d.set("mine", 1)
        assert d.keys() == ["mine"]
        d.flush_all()
        assert d.keys() == [] and all(redis_server.cmd("GET", k) == b"other" for k in neighbours)
    finally:
        for k in neighbours:
            redis_server.cmd("DEL", k)


def test_the_longest_key_and_one_byte_more(make_host, redis_server, redis_prefix):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    key = b"\xff\0" * 32767 + b"!"
    d.set(key, 1)
    assert d.get(key) == 1 and d.incr(key, 1) == 2
    with pytest.raises(hostscript.UsageError):
        d.set(key + b"x", 1)


def test_integer_edges(make_host, redis_server, redis_prefix):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    d.set("max", 2 ** 63 - 1)
    d.set("min", -(2 ** 63))
    for key, delta in (("max", 1), ("min", -1), ("max", 2 ** 63 - 1)):
        with pytest.raises(hostscript.SharedDictError, match="overflow"):
            d.incr(key, delta)
    assert d.incr("min", 2 ** 63 - 1) == -1 and d.incr("max", -(2 ** 63)) == -1
    d.set("zero", 0)
    assert d.incr("zero", -(2 ** 63)) == -(2 ** 63)
    d.set("f", 1, flags=7)  # a tagged integer: exact up to 2^53, refused beyond
    assert d.incr("f", 2 ** 53 - 2) == 2 ** 53 - 1 and d.get_with_flags("f") == (2 ** 53 - 1, 7)
    with pytest.raises(hostscript.SharedDictError, match="overflow"):
        d.incr("f", 1)


def test_ttls_round_up_to_a_millisecond(make_host, redis_server, redis_prefix):
    d = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)}).shared["meta"]
    d.set("tiny", 1, ttl=1e-9)
    d.set("odd", 1, ttl=1.0004)
    d.set("huge", 1, ttl=1e300)
    assert redis_server.cmd("PTTL", redis_prefix + "tiny") in (-2, 0, 1)  # PX 1, maybe gone
    assert 900 <= redis_server.cmd("PTTL", redis_prefix + "odd") <= 1001  # PX 1001
    assert d.ttl("huge") > 1e15 and d.get("huge") == 1
    assert d.expire("huge", 0) is True and d.ttl("huge") == 0
    assert redis_server.cmd("PTTL", redis_prefix + "huge") == -1


def test_concurrent_incr_with_init_and_ttl_counts_exactly(make_host, redis_server, redis_prefix,
                                                           engine):
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix)})
    host.load("""
        local C = {}
        function C:on_read_request(txn)
            for _ = 1, 50 do
                local v, err = hs.shared.meta:incr("fresh", 1, 100, 60)
                if not v then error(err) end
            end
        end
        return C""", name="count.lua")
    errors, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        out = host.fire("read_request", Transaction())
        if out.status is not Status.CONTINUE:
            errors.append(out.error.message)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:2]
    assert host.shared["meta"].get("fresh") == 100 + 8 * 50
    assert 55 < host.shared["meta"].ttl("fresh") <= 60  # the init's TTL, set once


def test_values_written_by_hs_redis_with_crlf_and_nul_stay_whole(rhost, redis_server,
                                                                  redis_prefix):
    got = lua(rhost, r"""
        local r = hs.redis("meta")
        local k = r.prefix .. "\r\n*1\r\n$4\r\nPING\r\n\0"
        r:call("SET", k, "\r\n+OK\r\n\0")
        return r:call("GET", k), r:call("PING")""")
    assert got == [b"\r\n+OK\r\n\0", b"PONG"]
    assert redis_server.cmd("GET", redis_prefix.encode() + b"\r\n*1\r\n$4\r\nPING\r\n\0") == \
        b"\r\n+OK\r\n\0"


def test_a_pipeline_that_raises_midway_sends_nothing(rhost, redis_server, redis_prefix):
    msg = lua_error(rhost, """
        local r = hs.redis("meta")
        r:pipeline(function(p)
            p:call("SET", r.prefix .. "a", 1)
            p:call("SET", r.prefix .. "b", {})
        end)""")
    assert "bad argument" in msg
    assert redis_server.cmd("EXISTS", redis_prefix + "a") == 0
    assert lua(rhost, 'local r = hs.redis("meta") return r:call("PING")') == [b"PONG"]


def test_a_pipeline_object_kept_past_its_function_is_closed(rhost):
    msg = lua_error(rhost, """
        local r, kept = hs.redis("meta")
        r:pipeline(function(p) kept = p end)
        kept:call("PING")""")
    assert "sent already" in msg
