#!/usr/bin/env python3
"""A coverage-guided fuzz target (atheris) over hostscript's Python API and C core.

From the fuzzer's bytes (tests/fuzz/grammar.py) it builds one or two Lua handler
scripts from a grammar of snippets — header reads and writes on txn.req/txn.resp,
txn.ctx, txn:respond, hs.log, string functions and patterns, pcall/error, loops,
recursion, coroutines, memory and time bombs, with random literal bytes — and
Python-side inputs: header pairs, raw header blocks, mappings, email messages, ctx
dicts, methods, URIs, statuses, bodies and Headers operations. It loads the scripts
on a Host(time_limit=0.02, memory_limit=8 MiB) of the engine the bytes pick (or
HS_FUZZ_ENGINE), fires a few hooks on one or two transactions, from this thread or
a worker thread, and reads everything back.

Invariants; a violation raises Violation (an AssertionError), which atheris
reports as a crash with the input saved, after printing what the input built:
  * the process never crashes (a crash is libFuzzer's "deadly signal");
  * every exception hostscript raises is a hostscript.Error (KeyError only from a
    mapping lookup, h[name] / del h[name]);
  * every header name read back is a token, no header value holds a control
    character other than tab, the method is a token, the URI holds no space or
    control character, a status is None or 100..999, txn.ctx reads back as plain
    data (twice the same);
  * a fire (and a load) returns within FIRE_BOUND (1 s: 50x the time limit);
    one that never returns is libFuzzer's -timeout (make fuzz: 10 s), or the
    watchdog's in replay mode;
  * after a fire ended in ERROR (or raised), and at the end of every input, a
    fire on a fresh transaction works: the probe (every generated handler starts
    by answering a transaction with the x-fuzz-probe header) returns CONTINUE with
    txn.ctx == {"probe": True};
  * a closed host refuses fires with ClosedError.

Coverage: atheris.instrument_imports() instruments the Python side (hostscript's
modules and grammar.py, whose choices then steer the search). The C core and the
_bridge extension are NOT instrumented: that needs clang's -fsanitize=fuzzer-no-link,
which this machine's toolchain (gcc) lacks, so the C side is exercised, not measured.

Known findings (KNOWN below) are steered around by default so a long run looks for
new ones; HS_FUZZ_AVOID=none turns that off (HS_FUZZ_AVOID=a,b picks). The same
setting must be used to replay an input, and HS_FUZZ_ENGINE too when the run forced
one (an input builds the same script either way: it reads its engine byte even when
the variable overrides it).

tests/fuzz/corpus is a seed corpus: the corpus of the first runs (10+ minutes on
each engine) reduced with libFuzzer's -merge=1; tests/test_fuzz_smoke.py starts from
it, `make fuzz` can be pointed at it (it writes new inputs to build/fuzz/corpus).

Usage:
  python tests/fuzz/fuzz_fire.py [libFuzzer flags] [CORPUS_DIR ...]   # fuzz (atheris)
  python tests/fuzz/fuzz_fire.py CRASHFILE ...          # plain replay: run, report, exit 1 on a violation
  python tests/fuzz/fuzz_fire.py --show CRASHFILE       # replay and print the scripts and inputs built
Environment: HS_FUZZ_ENGINE=luajit|lua54 (default: from the bytes),
HS_FUZZ_AVOID, HS_FUZZ_FIRE_BOUND (seconds, default 1.0).
"""
from __future__ import annotations

import email.message  # noqa: F401 - imported before instrumenting: not ours to measure
import faulthandler
import logging
import math
import os
import pathlib
import queue
import shlex
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout's hostscript, then grammar.py

try:
    import atheris
except ImportError:  # plain replay still works
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import grammar
        import hostscript
else:
    import grammar
    import hostscript

from grammar import HOOKS, PROBE_HEADER, Source  # noqa: E402

ENGINES = ("luajit", "lua54")
TIME_LIMIT = 0.02
MEMORY_LIMIT = 8 << 20
FIRE_BOUND = float(os.environ.get("HS_FUZZ_FIRE_BOUND") or 1.0)
HANG_SECONDS = 20.0  # replay watchdog; libFuzzer's -timeout when fuzzing
ENGINE = os.environ.get("HS_FUZZ_ENGINE") or None
if ENGINE is not None and ENGINE not in ENGINES:
    sys.exit(f"HS_FUZZ_ENGINE must be one of {ENGINES}, not {ENGINE!r}")

# Findings of this fuzzer the core has not fixed yet, by name: the grammar steers
# around them (tests/test_fuzz_findings.py has the fixed ones).
KNOWN: dict = {}  # all findings so far are fixed (tests/test_fuzz_findings.py keeps them)
_avoid = os.environ.get("HS_FUZZ_AVOID", "known")
if _avoid == "known":
    AVOID = frozenset(KNOWN)
elif _avoid in ("", "none"):
    AVOID = frozenset()
else:
    AVOID = frozenset(a.strip() for a in _avoid.split(",") if a.strip())

KINDS = {"runtime", "timeout", "memory", "ctx", "usage", "script", "syntax"}
TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Violation(AssertionError):
    pass


class _FormatLogs(logging.Handler):
    """Formats every record hostscript logs (what a real handler would do), quietly."""

    def emit(self, record: logging.LogRecord) -> None:
        record.getMessage()


_log = logging.getLogger("hostscript")
_log.addHandler(_FormatLogs())
_log.setLevel(logging.DEBUG)
_log.propagate = False


class Trace:
    """What the current input built, printed with a violation (and by --show)."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, Any]] = []
        self.stream = False  # --show: print as it goes (a hang shows what it hangs in)

    def add(self, label: str, obj: Any = None) -> None:
        self.items.append((label, obj))
        if self.stream:
            self.show(label, obj, sys.stdout)
            sys.stdout.flush()

    @staticmethod
    def show(label: str, obj: Any, out: Any) -> None:
        if isinstance(obj, str) and "\n" in obj:
            print(f"--- {label}:\n{obj}", file=out)
        elif obj is None:
            print(f"--- {label}", file=out)
        else:
            print(f"--- {label}: {_short_repr(obj)}", file=out)

    def dump(self, out: Any = sys.stderr) -> None:
        for label, obj in self.items:
            self.show(label, obj, out)


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception as e:  # a cycle is fine for repr; anything else is shown as such
        text = f"<repr failed: {e!r}>"
    return text if len(text) < 2000 else text[:2000] + f"... ({len(text)} chars)"


TRACE = Trace()


def violation(msg: str) -> None:
    print("\n=== hostscript fuzz: invariant violated; the input built:", file=sys.stderr)
    TRACE.dump()
    raise Violation("hostscript fuzz invariant violated: " + msg)


def call(what: str, fn: Callable[..., Any], *args: Any, lookup: bool = False, **kw: Any
         ) -> Tuple[bool, Any]:
    """(True, result) or (False, exception) for the exceptions hostscript may raise."""
    try:
        return True, fn(*args, **kw)
    except Violation:
        raise
    except hostscript.Error as e:
        return False, e
    except KeyError as e:
        if lookup:
            return False, e
        violation(f"{what} raised KeyError outside a mapping lookup: {e!r}")
    except grammar.UserCodeError as e:  # our own __str__ raised: passing it on is fine
        return False, e
    except BaseException as e:  # noqa: BLE001 - the point
        if isinstance(e, KeyboardInterrupt):
            raise
        violation(f"{what} raised {type(e).__module__}.{type(e).__name__}, not a hostscript.Error: "
                  f"{e!r}\n{traceback.format_exc()}")
    raise AssertionError("unreachable")


# ---- a worker thread: fires from a thread other than the one that loaded ----

class Worker:
    def __init__(self) -> None:
        self.q: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._loop, name="fuzz-worker", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.q.get()
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box["error"] = e
            done.set()

    def run(self, fn: Callable[[], Any]) -> Any:
        box: Dict[str, Any] = {}
        done = threading.Event()
        self.q.put((fn, box, done))
        if not done.wait(HANG_SECONDS * 3):
            violation(f"a call in the worker thread did not return within {HANG_SECONDS * 3} s")
        if "error" in box:
            raise box["error"]
        return box["result"]


WORKER: Optional[Worker] = None


def worker() -> Worker:
    global WORKER
    if WORKER is None:
        WORKER = Worker()
    return WORKER


# ---- reading back ----

def check_text(value: Any, what: str) -> None:
    if type(value) is not str:
        violation(f"{what} read back as {type(value).__name__}, not str: {value!r}")


def is_token(s: str) -> bool:
    return bool(s) and all(c in TCHAR for c in s)


def check_plain(v: Any, path: str, depth: int = 0) -> None:
    if depth > 40:
        violation(f"txn.ctx{path} nests deeper than 40")
    if isinstance(v, (str, bytes, int, float)):  # bool is an int
        return
    if type(v) is list:
        for i, x in enumerate(v):
            check_plain(x, f"{path}[{i}]", depth + 1)
        return
    if type(v) is dict:
        for k, x in v.items():
            if not isinstance(k, (str, bytes, int, float)):
                violation(f"txn.ctx{path} has a {type(k).__name__} key: {k!r}")
            check_plain(x, f"{path}[{k!r}]", depth + 1)
        return
    violation(f"txn.ctx{path} read back as {type(v).__name__}: {v!r}")


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_headers(h: Any, what: str) -> None:
    ok, items = call(f"{what}.items()", h.items)
    if not ok:
        violation(f"{what}.items() raised {items!r}")
    if type(items) is not list:
        violation(f"{what}.items() is a {type(items).__name__}")
    for pair in items:
        if type(pair) is not tuple or len(pair) != 2:
            violation(f"{what}.items() holds {pair!r}")
        n, v = pair
        check_text(n, f"a header name in {what}")
        check_text(v, f"a header value in {what}")
        if not is_token(n):
            violation(f"{what} holds a header name that is not a token: {n!r}")
        bad = [c for c in v if (c < " " and c != "\t") or c == "\x7f"]
        if bad:
            violation(f"{what}[{n!r}] holds control characters {bad!r}: {v!r}")
    if len(h) != len(items):
        violation(f"len({what}) = {len(h)} but items() has {len(items)}")
    if list(h) != items:
        violation(f"iterating {what} gives {list(h)!r}, items() {items!r}")
    for n, v in items[:8]:
        ok, first = call(f"{what}[{n!r}]", h.__getitem__, n, lookup=True)
        if not ok:
            violation(f"{what}[{n!r}] raised {first!r} though items() lists it")
        want = next(v2 for n2, v2 in items if n2.lower() == n.lower())
        if first != want:
            violation(f"{what}[{n!r}] = {first!r}, items() says the first is {want!r}")
        if n.swapcase() not in h:
            violation(f"{n.swapcase()!r} not in {what}: lookups must ignore ASCII case")
        every = h.get_all(n)
        if every != [v2 for n2, v2 in items if n2.lower() == n.lower()]:
            violation(f"{what}.get_all({n!r}) = {every!r} disagrees with items() {items!r}")


def check_txn(txn: Any, where: str, ctx_plain: bool) -> None:
    ok, req = call("txn.request", lambda: txn.request)
    ok2, resp = call("txn.response", lambda: txn.response)
    if not (ok and ok2):
        violation(f"{where}: txn.request/response raised {req if not ok else resp!r}")
    check_headers(req.headers, "txn.request.headers")
    check_headers(resp.headers, "txn.response.headers")
    m, u = req.method, req.uri
    check_text(m, "the method")
    check_text(u, "the uri")
    if not is_token(m):
        violation(f"{where}: the method {m!r} is not a token")
    if any(c <= " " or c == "\x7f" for c in u):
        violation(f"{where}: the uri {u!r} holds a space or control character")
    st = resp.status
    if st is not None and (type(st) is not int or not 100 <= st <= 999):
        violation(f"{where}: response status {st!r}")
    if type(resp.body) is not bytes:
        violation(f"{where}: response body is {type(resp.body).__name__}")
    ok, c1 = call("txn.ctx", lambda: txn.ctx)
    if ok:
        if type(c1) is not dict:
            violation(f"{where}: txn.ctx is a {type(c1).__name__}")
        if ctx_plain:
            check_plain(c1, "")
        ok2, c2 = call("txn.ctx", lambda: txn.ctx)
        if not ok2:
            violation(f"{where}: reading txn.ctx a second time raised {c2!r}")
        if ctx_plain and not same(c1, c2):
            violation(f"{where}: txn.ctx read twice differs: {c1!r} then {c2!r}")


# ---- one input ----

class Run:
    def __init__(self, data: bytes) -> None:
        self.s = Source(data)
        self.host: Any = None
        self.handled: Dict[str, Optional[frozenset]] = {}  # script -> hooks (None: unknown)
        self.txns: List[Any] = []
        self.engine = ""

    def timed(self, what: str, fn: Callable[[], Tuple[bool, Any]], in_worker: bool
              ) -> Tuple[bool, Any]:
        def go() -> Tuple[bool, Any, float]:
            t0 = time.monotonic()
            ok, out = fn()
            return ok, out, time.monotonic() - t0
        ok, out, took = worker().run(go) if in_worker else go()
        if took > FIRE_BOUND:
            violation(f"{what} took {took:.3f} s (time_limit {TIME_LIMIT} s, bound {FIRE_BOUND} s)")
        return ok, out

    def load(self) -> None:
        s = self.s
        gen = grammar.LuaGen(s, AVOID)
        src, hooks, plain = gen.script()
        name = s.pick(["fuzz1.lua", "fuzz2.lua", "fuzz1.lua", "fuzz2.lua", "a" * 300 + ".lua",
                       "x\x00y", "\u00e9.lua", ""])
        TRACE.add(f"load {name!r}", src)
        ok, err = self.timed("host.load", lambda: call("host.load", self.host.load, src, name=name),
                             False)
        if ok:
            self.handled[name] = frozenset(hooks) if plain else None
            TRACE.add("  loaded")
        else:
            TRACE.add("  refused", err)
            if not isinstance(err, hostscript.ScriptError) and not isinstance(err, hostscript.UsageError):
                violation(f"host.load failed with {type(err).__name__}, not ScriptError: {err!r}")

    def new_txn(self) -> Any:
        s = self.s
        kw: Dict[str, Any] = {}
        if s.chance(1, 3):
            kw["method"] = grammar.py_text(s, grammar.METHODS)
        if s.chance(1, 3):
            kw["uri"] = grammar.py_text(s, grammar.URIS)
        if s.chance(3, 4):
            kw["headers"] = grammar.header_source(s)
        if s.chance(1, 4):
            kw["status"] = s.pick([None, 0, 99, 100, 200, 999, 1000, -1, 2 ** 70, "200", 200.0, True])
        if s.chance(1, 4):
            kw["response_headers"] = grammar.header_source(s)
        if s.chance(1, 4):
            kw["body"] = s.pick([b"", b"body", "caf\u00e9", "\udc80", bytearray(b"x"), 5, None])
        TRACE.add("Transaction", kw)
        ok, txn = call("Transaction(...)", hostscript.Transaction, **kw)
        if not ok:
            TRACE.add("  refused", txn)
            txn = hostscript.Transaction()
        check_txn(txn, "a new transaction", True)
        return txn

    def python_ops(self, txn: Any) -> None:
        s = self.s
        for _ in range(s.below(5)):
            h = txn.request.headers if s.chance(1, 2) else txn.response.headers
            name = grammar.py_text(s, grammar.NAMES)
            k = s.below(17)
            if k == 0:
                what, fn, args, lookup = "h[name]", h.__getitem__, (name,), True
            elif k == 1:
                what, fn, args, lookup = "h.get(name)", h.get, (name,), False
            elif k == 2:
                what, fn, args, lookup = "h.get_all(name)", h.get_all, (name,), False
            elif k == 3:
                what, fn, args, lookup = "name in h", h.__contains__, (name,), False
            elif k == 4:
                value = s.pick([grammar.py_text(s, grammar.VALUES), None,
                                [grammar.py_text(s, grammar.VALUES), "2"], ("a", b"b"), []])
                what, fn, args, lookup = "h[name] = value", h.__setitem__, (name, value), False
            elif k == 5:
                what, fn, args, lookup = "del h[name]", h.__delitem__, (name,), True
            elif k == 6:
                what, fn, args, lookup = "h.add(name, value)", h.add, \
                    (name, grammar.py_text(s, grammar.VALUES)), False
            elif k == 7:
                what, fn, args, lookup = "h.remove(name)", h.remove, (name,), False
            elif k == 8:
                what, fn, args, lookup = "h.clear()", h.clear, (), False
            elif k == 9:
                part = txn.request if s.chance(1, 2) else txn.response
                what, fn, args, lookup = "part.headers = source", setattr, \
                    (part, "headers", grammar.header_source(s)), False
            elif k == 10:
                what, fn, args, lookup = "txn.request.method = v", setattr, \
                    (txn.request, "method", grammar.py_text(s, grammar.METHODS)), False
            elif k == 11:
                what, fn, args, lookup = "txn.request.uri = v", setattr, \
                    (txn.request, "uri", grammar.py_text(s, grammar.URIS)), False
            elif k == 12:
                what, fn, args, lookup = "txn.response.status = v", setattr, \
                    (txn.response, "status", s.pick([None, 0, 99, 100, 204, 999, 1000, "200",
                                                      2.0, 2 ** 64, False])), False
            elif k == 13:
                what, fn, args, lookup = "txn.response.body = v", setattr, \
                    (txn.response, "body", s.pick([b"", b"x" * 100, "\u20ac", "\udc80",
                                                    memoryview(b"mv"), 1, None])), False
            elif k == 14:
                what, fn, args, lookup = "txn.ctx = v", setattr, (txn, "ctx", grammar.py_ctx(s)), False
            elif k == 15:
                key, value = grammar.py_key(s), grammar.py_value(s, 2)
                ok, ctx = call("txn.ctx", lambda: txn.ctx)
                if not ok:
                    continue
                what, fn, args, lookup = "txn.ctx[key] = v", ctx.__setitem__, (key, value), False
            else:
                what, fn, args, lookup = "len/iter/items", lambda: (len(h), list(h), h.items()), \
                    (), False
            TRACE.add(what, args)
            ok, out = call(what, fn, *args, lookup=lookup)
            if not ok:
                TRACE.add("  raised", out)
            check_txn(txn, f"after {what}", False)

    def fire(self) -> None:
        s = self.s
        txn = s.pick(self.txns)
        hook = s.pick(HOOKS) if s.chance(7, 8) else s.pick(["nope", "", 5, None, "on_read_request"])
        in_worker = s.chance(1, 4)
        TRACE.add(f"fire {hook!r} on txn {self.txns.index(txn)}" + (" in the worker" if in_worker else ""))
        ok, out = self.timed(f"fire({hook!r})", lambda: call("host.fire", self.host.fire, hook, txn),
                             in_worker)
        failed = not ok
        if ok:
            if not isinstance(out, hostscript.Outcome):
                violation(f"fire returned {out!r}, not an Outcome")
            if out.status not in (hostscript.Outcome.CONTINUE, hostscript.Outcome.DONE,
                                  hostscript.Outcome.ERROR):
                violation(f"fire returned status {out.status!r}")
            if out.status is hostscript.Outcome.ERROR:
                failed = True
                err = out.error
                if not isinstance(err, hostscript.HandlerError):
                    violation(f"an ERROR outcome carries {err!r}, not a HandlerError")
                if err.kind not in KINDS:
                    violation(f"a HandlerError of unknown kind {err.kind!r}: {err}")
                if isinstance(hook, str) and err.hook != hook:
                    violation(f"a HandlerError of hook {err.hook!r} from a fire of {hook!r}")
                str(err)
                TRACE.add("  ERROR", (err.kind, err.message[:300]))
            elif out.error is not None:
                violation(f"a {out.status} outcome carries an error: {out.error!r}")
            else:
                TRACE.add("  " + out.status.name)
        else:
            TRACE.add("  raised", out)
            if isinstance(out, KeyError):
                violation(f"fire raised {out!r}")
        # a fire that raised (Python's ctx refused) leaves Python's dict as it was
        check_txn(txn, f"after fire({hook!r})", ok)
        if failed and hook in HOOKS:
            self.probe(hook, f"after fire({hook!r}) failed", in_worker)

    def probe(self, hook: str, why: str, in_worker: bool) -> None:
        txn = hostscript.Transaction(headers=[(PROBE_HEADER, "1")])
        ok, out = self.timed(f"the probe fire({hook!r})",
                             lambda: call("host.fire (probe)", self.host.fire, hook, txn), in_worker)
        if (ok and out.status is hostscript.Outcome.ERROR and out.error.kind == "memory"
                and self.engine == "luajit" and "luajit-caught-oom" in AVOID):
            TRACE.add("  probe: memory error (known: luajit-caught-oom); once more")
            txn = hostscript.Transaction(headers=[(PROBE_HEADER, "1")])
            ok, out = self.timed(f"the probe fire({hook!r})",
                                 lambda: call("host.fire (probe)", self.host.fire, hook, txn),
                                 in_worker)
        if not ok:
            violation(f"{why}: the next fire on a fresh transaction raised {out!r}")
        if out.status is not hostscript.Outcome.CONTINUE:
            violation(f"{why}: the next fire on a fresh transaction ended {out.status.name}: {out.error}")
        known = [h for h in self.handled.values()]
        ctx = txn.ctx
        if any(h is not None and hook in h for h in known):
            want: Any = [{"probe": True}]
        elif all(h is not None and hook not in h for h in known):
            want = [{}]
        else:  # a class returned through a metatable: whether its handlers count is the core's call
            want = [{}, {"probe": True}]
        if ctx not in want:
            violation(f"{why}: the next fire on a fresh transaction left txn.ctx = {ctx!r}, not "
                      f"{' or '.join(map(repr, want))}")
        if txn.response.headers.items() or txn.response.status is not None:
            violation(f"{why}: a fresh transaction's probe got a response: "
                      f"{txn.response.status} {txn.response.headers.items()}")

    def run(self) -> None:
        s = self.s
        engine = s.pick(ENGINES)  # read even when forced: an input means the same either way
        engine = self.engine = ENGINE or engine
        pool = s.pick([16, 0])
        TRACE.add("Host", dict(engine=engine, time_limit=TIME_LIMIT, memory_limit=MEMORY_LIMIT,
                               state_pool=pool))
        ok, host = call("Host(...)", hostscript.Host, HOOKS, engine=engine, time_limit=TIME_LIMIT,
                        memory_limit=MEMORY_LIMIT, state_pool=pool)
        if not ok:
            violation(f"Host(...) raised {host!r}")
        self.host = host
        try:
            for _ in range(1 + s.below(2)):
                self.load()
            self.txns = [self.new_txn() for _ in range(1 + s.below(2))]
            for _ in range(1 + s.below(6)):
                k = s.below(10)
                if k < 6:
                    self.fire()
                elif k < 8:
                    self.python_ops(s.pick(self.txns))
                elif k == 8:
                    self.load()  # a reload between fires
                else:
                    name = s.pick(["fuzz1.lua", "fuzz2.lua", "nope.lua"])
                    TRACE.add(f"unload {name!r}")
                    ok, _ = call("host.unload", host.unload, name)
                    if ok:
                        self.handled.pop(name, None)
            for hook in ("read_request", s.pick(HOOKS)):
                self.probe(hook, "at the end of the input", s.chance(1, 4))
            ok, st = call("host.stats()", host.stats)
            if not ok or st["fires"] < 1 or st["heap_max"] > MEMORY_LIMIT + (1 << 20):
                violation(f"host.stats() = {st!r}")
            ok, names = call("host.scripts", lambda: host.scripts)
            if not ok or sorted(names) != sorted(self.handled):
                violation(f"host.scripts = {names!r}, loaded {sorted(self.handled)!r}")
        finally:
            host.close()
        ok, out = call("fire on a closed host", host.fire, "read_request", hostscript.Transaction())
        if ok or not isinstance(out, hostscript.ClosedError):
            violation(f"a fire on a closed host gave {out!r}, not ClosedError")


def TestOneInput(data: bytes) -> None:
    TRACE.items.clear()
    Run(data).run()


# ---- entry points ----

def replay(paths: List[str], show: bool) -> int:
    TRACE.stream = show
    failed = 0
    for p in paths:
        data = pathlib.Path(p).read_bytes()
        faulthandler.enable()
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            TestOneInput(data)
        except Violation as e:
            failed += 1
            print(f"FAIL {p}: {e}", file=sys.stderr)
            if not show:
                traceback.print_exc()
            continue
        finally:
            faulthandler.cancel_dump_traceback_later()
        print(f"ok {p} ({len(data)} bytes)")
    return 1 if failed else 0


def main(argv: List[str]) -> int:
    args = argv[1:]
    show = "--show" in args
    args = [a for a in args if a != "--show"]
    files = [a for a in args if not a.startswith("-")]
    if show or (files and all(os.path.isfile(f) for f in files) and len(files) == len(args)) \
            or atheris is None:
        if not files:
            print(__doc__, file=sys.stderr)
            return 2
        return replay(files, show)
    print(f"hostscript {hostscript.__file__}; engine {ENGINE or 'from the input'}; "
          f"avoiding {sorted(AVOID) or 'nothing'}", file=sys.stderr)
    # libFuzzer's -merge/-fork run argv[0] through the shell: make that this interpreter
    argv = [f"{shlex.quote(sys.executable)} {shlex.quote(str(pathlib.Path(argv[0]).resolve()))}",
            *argv[1:]]
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
