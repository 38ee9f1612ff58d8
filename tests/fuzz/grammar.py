"""What tests/fuzz/fuzz_fire.py builds from the fuzzer's bytes: Lua handler scripts
from a grammar of snippets, and the Python-side inputs (header sources, ctx values,
method/URI/status/body, Headers operations).

Everything here is a pure function of the bytes (``Source``): no randomness, no
clock, so a crash file replays to the same script and the same calls. When the
bytes run out every choice reads 0, and choice 0 is always a leaf, so generation
always ends.

``avoid`` names the known findings (see fuzz_fire.py's KNOWN) that the generator
steers around, so a long run looks for new ones. Avoiding changes only how a choice
is rendered, never how many bytes it consumes: an input means the same script with
or without it, except at the avoided spots.
"""
from __future__ import annotations

import email.message
from typing import Any, Callable, List, Sequence, Tuple

HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")
PROBE_HEADER = "x-fuzz-probe"

# Header names: valid ones in several cases, an almost-valid one, and the ones the
# harness itself uses. Random bytes are added by Source.name_bytes().
NAMES = ["x-a", "X-A", "Host", "content-length", "set-cookie", "Accept", "x-b", "X-Rep",
         "x" * 300, "!#$%&'*+-.^_`|~", "a b", "x:y", "", "x\r\ny", "\xe9t\xe9", "1"]
METHODS = ["GET", "POST", "M-SEARCH", "get", "", "G T", "GET\r\n", "\x7f", "\xff"]
URIS = ["/", "/a?b=1", "*", "http://x/y", "", "/a b", "/a\r\nX: y", "/caf\xe9", "/\x00", "%00"]
STATUS = ["0", "1", "-1", "99", "100", "200", "204", "302", "404", "999", "1000", "200.5",
          "1e308", "0/0", "math.huge", "-math.huge", "2^31", "2^53", "2^63", "-0.0", "'200'",
          "'2e2'", "'x'", "nil", "true", "{}"]
NUMBERS = ["0", "1", "-1", "2", "7", "10", "100", "1000", "65536", "1e6", "1e7", "1e9", "2^31",
           "2^53", "2^53 + 1", "2^63", "-2^63", "1e308", "-1e308", "1e-320", "0.5", "-0.0",
           "0/0", "math.huge", "-math.huge", "math.pi", "0x7fffffff", "0xffffffff",
           "(math.maxinteger or 2^63)", "(math.mininteger or -2^63)"]
COUNTS = ["0", "1", "2", "3", "8", "40", "200", "1000", "1e4", "1e5", "1e6", "1e7", "1e9",
          "-1", "2^31", "1e300", "0/0", "math.huge"]
PATTERN_ITEMS = [".", "%a", "%d", "%s", "%w", "%x", "%p", "%c", "%u", "%l", "%z", "[a-z]", "[^%s]",
                 "[%]]", "[]", "[^]", "-", "*", "+", "?", "(", ")", "()", "%1", "%2", "%b()",
                 "%f[%w]", "%f", "^", "$", "x", "a", "%", "%%", "\\0", "\\255", "[\\0-\\255]"]
REPLS = ["''", "'%0'", "'%1'", "'%2'", "'%%'", "'%z'", "'%'", "'x'", "{}", "{a = 'b'}",
         "{a = {}}", "function(...) return nil end", "function(s) return s .. s end",
         "function() return {} end", "function() error('in repl') end",
         "function() while true do end end"]
FORMATS = ["%s", "%q", "%d", "%5.2s", "%x", "%c", "%g", "%a", "%i", "%o", "%u", "%e", "%%",
           "%10s", "%-99s", "%099d", "%.99f", "%.3q", "%z", "%", "%s%s", "%5", "%.500s"]
DATE_FORMATS = ["'%c'", "'*t'", "'!*t'", "'%Y-%m-%d'", "'%Ez'", "'%'", "'%Q'", "'%E'", "'%O'",
                "''", "'%%'", "'%5Y'", "string.rep('%c', 1000)"]
PACK_FORMATS = ["'i4'", "'>I2'", "'s1'", "'z'", "'d'", "'j'", "'i16'", "'i17'", "'!4 i3'",
                "'X'", "'Xi4'", "'c10'", "'c0'", "'s'", "'<!16'", "'i0'", "'n'", "'T'"]
LEVELS = ["debug", "info", "warn", "error"]


class Source:
    """Choices read from the fuzzer's bytes, front to back; 0 once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def chance(self, num: int, den: int) -> bool:
        return self.below(den) < num

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def blob(self, maxlen: int = 16) -> bytes:
        n = self.below(maxlen + 1)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def text_bytes(self, maxlen: int = 16) -> bytes:
        """Mostly printable bytes, with now and then a control character or a high one."""
        raw = self.blob(maxlen)
        out = bytearray()
        for b in raw:
            if b < 0xC0:
                out.append(0x20 + b % 0x5F)  # printable ASCII
            else:
                out.append((0, 9, 10, 13, 0x7F, 0x80, 0xE9, 0xFF, 0x1B, 0x0B, 0x20, 0x22, 0x5C,
                            0x5B, 0x5D, 0x25)[b % 16])
        return bytes(out)


def lua_quote(data: bytes) -> str:
    """A Lua string literal holding DATA exactly, on both engines."""
    out = ['"']
    for b in data:
        if 0x20 <= b < 0x7F and b not in (0x22, 0x5C):
            out.append(chr(b))
        else:
            out.append("\\%03d" % b)
    out.append('"')
    return "".join(out)


class LuaGen:
    """A handler script from the bytes."""

    def __init__(self, src: Source, avoid: frozenset = frozenset()) -> None:
        self.s = src
        self.avoid = avoid
        self.budget = 160  # nodes left; then only leaves
        self.nfun = 0
        self.in_coroutine = 0

    # ---- helpers ----

    def spend(self) -> bool:
        """False when out of budget or bytes: take a leaf."""
        self.budget -= 1
        return self.budget > 0 and not self.s.exhausted

    def choose(self, options: Sequence[Callable[[int], str]], d: int) -> str:
        """options[0] is the leaf, taken at depth 0 or out of budget."""
        if d <= 0 or not self.spend():
            return options[0](0)
        return self.s.pick(options)(d - 1)

    def literal(self) -> str:
        if self.s.chance(1, 4):
            return lua_quote(self.s.blob(24))
        return lua_quote(self.s.text_bytes(24))

    def name(self, d: int = 1) -> str:
        k = self.s.below(24)
        if k < len(NAMES):
            return lua_quote(NAMES[k].encode("latin-1"))
        if k == 16:
            return self.literal()
        if k == 17 and d > 0:
            return self.str_expr(d - 1)
        if k == 18:
            return self.s.pick(["1", "{}", "nil", "true", "0/0", "2^63"])
        if k == 19:
            return "txn.req.headers:get(%s) or 'x-a'" % lua_quote(b"host")
        return lua_quote(self.s.pick([b"x-a", b"x-b", b"x-c", b"Host", b"X-A"]))

    def number(self) -> str:
        if self.s.chance(1, 4):
            return str(self.s.below(1 << 16) - 128)
        return self.s.pick(NUMBERS)

    def count(self) -> str:
        return self.s.pick(COUNTS)

    def c_start(self, starts: Sequence[str]) -> str:
        """Where such a loop starts: with c_count, far from the end only when not avoided."""
        start = self.s.pick(starts)
        return "1" if "c-call-time" in self.avoid else start

    def c_count(self) -> str:
        """A count a C library function loops over by itself (string.rep, table.move)."""
        n = self.count()
        if "c-call-time" in self.avoid:  # known finding: the count hook cannot stop the loop
            return "math.min(%s, 1e6)" % n
        return n

    # ---- expressions ----

    def str_expr(self, d: int) -> str:
        """An expression that is usually a string (sometimes nil or a number)."""
        return self.choose([
            lambda d: self.literal(),
            lambda d: self.literal(),
            lambda d: "tostring(txn.req.headers[%s])" % self.name(d),
            lambda d: "(txn.req.headers[%s] or %s)" % (self.name(d), self.literal()),
            lambda d: "txn.resp.headers:get(%s)" % self.name(d),
            lambda d: self.s.pick(["txn.req.method", "txn.req.uri", "txn.resp.body",
                                   "tostring(txn.resp.status)", "hs.engine", "tostring(hs.jit)",
                                   "_VERSION", "tostring(txn.ctx.s)", "tostring(self)",
                                   "tostring(#txn.req.uri)"]),
            lambda d: "v%d" % self.s.below(3),
            lambda d: "string.rep(%s, %s%s)" % (self.str_expr(d), self.c_count(),
                                               ", " + self.str_expr(d) if self.s.chance(1, 4) else ""),
            lambda d: "(%s):%s" % (self.str_expr(d), self.s.pick([
                "upper()", "lower()", "reverse()", "len()", "byte()", "sub(2)", "sub(-3, -1)",
                "sub(0)", "sub(2^53)", "sub(-2^63)", "sub(%s, %s)" % (self.number(), self.number()),
                "byte(1, -1)", "byte(-1e9, 1e9)"])),
            lambda d: "string.format(%s, %s)" % (lua_quote(self.s.pick(FORMATS).encode())
                                                 if self.s.chance(3, 4) else self.literal(),
                                                 self.any_expr(d)),
            lambda d: "(%s .. %s)" % (self.str_expr(d), self.str_expr(d)),
            lambda d: "table.concat({%s, %s, %s}, %s)" % (self.str_expr(d), self.str_expr(d),
                                                          self.number(), self.str_expr(d)),
            lambda d: "string.char(%s)" % ", ".join(str(self.s.pick([0, 9, 10, 13, 32, 58, 127,
                                                                     128, 255, 256, -1, 65]))
                                                    for _ in range(1 + self.s.below(4))),
            lambda d: "tostring(%s)" % self.number(),
            lambda d: "(%s)" % self.pattern_call(d),
            lambda d: "tostring(txn.ctx[%s])" % self.ctx_key(d),
            lambda d: "(%s)" % self.s.pick([
                "utf8 and utf8.char(72, 0x7FFFFFFF) or 'u'", "utf8 and utf8.char(-1) or 'u'",
                "utf8 and tostring(utf8.len(%s)) or 'u'", "tostring(tonumber(%s))",
                "tostring(tonumber(%s, 36))", "tostring(select('#', %s, nil, nil))",
                "os.date(%s)", "tostring(os.time())", "tostring(math.floor(%s))",
                "tostring(math.tointeger and math.tointeger(%s))", "type(%s)",
                "tostring(string.len(%s))", "tostring((%s) == nil)"]).replace(
                    "%s", self.str_expr(d), 1),
            lambda d: "os.date(%s, %s)" % (self.s.pick(DATE_FORMATS), self.number()),
            lambda d: "(string.pack and string.pack(%s, %s) or 'p')" % (
                self.s.pick(PACK_FORMATS), self.any_expr(d)),
            lambda d: "tostring(string.unpack and string.unpack(%s, %s))" % (
                self.s.pick(PACK_FORMATS), self.str_expr(d)),
            lambda d: "(%s)(%s)" % (self.function(d), self.str_expr(d)),
            lambda d: "(%s(%s) or tostring)(%s)" % (self.fn("load"), self.code_string(d),
                                                    self.str_expr(d)),
            lambda d: "tostring(setmetatable({}, {__tostring = function() return %s end}))" %
                      self.any_expr(d),
        ], d)

    def any_expr(self, d: int) -> str:
        return self.choose([
            lambda d: self.number(),
            lambda d: self.str_expr(d),
            lambda d: self.s.pick(["nil", "true", "false", "{}", "txn", "txn.req", "txn.ctx",
                                   "txn.req.headers", "hs", "hs.DONE", "self", "print",
                                   "coroutine.create(print)", "string"]),
            lambda d: self.table_expr(d),
            lambda d: "(%s + %s)" % (self.number(), self.any_expr(d)),
            lambda d: "(%s %s %s)" % (self.number(), self.s.pick(["//", "%", "/", "^", "<", ".."]),
                                      self.number()),
            lambda d: "#%s" % self.str_expr(d),
            lambda d: "txn.req.headers:get_all(%s)" % self.name(d),
        ], d)

    def table_expr(self, d: int) -> str:
        items = []
        for _ in range(self.s.below(4)):
            if self.s.chance(1, 2):
                items.append(self.ctx_value(d))
            else:
                items.append("[%s] = %s" % (self.ctx_key(d), self.ctx_value(d)))
        return "{%s}" % ", ".join(items)

    def pattern(self) -> str:
        if self.s.chance(1, 5):
            return self.literal()
        n = self.s.below(9)
        if "c-call-time" in self.avoid:
            n = min(n, 5)
        return lua_quote("".join(self.s.pick(PATTERN_ITEMS) for _ in range(n)).encode("latin-1"))

    def pattern_call(self, d: int) -> str:
        subject = self.str_expr(d)
        k = self.s.below(6)
        if "c-call-time" in self.avoid:  # known finding: one C call the count hook cannot stop
            subject = "(%s):sub(1, %d)" % (subject, 4096 if k >= 4 else 24)
        pat = self.pattern()
        if k == 0:
            return "string.gsub(%s, %s, %s%s)" % (subject, pat, self.s.pick(REPLS),
                                                  ", " + self.count() if self.s.chance(1, 3) else "")
        if k == 1:
            return "tostring(string.match(%s, %s, %s))" % (subject, pat, self.number())
        if k == 2:
            return "tostring(string.find(%s, %s, %s, %s))" % (subject, pat, self.number(),
                                                               self.s.pick(["true", "false", "nil"]))
        if k == 3:
            return ("(function() local r = {} for a, b in string.gmatch(%s, %s) do "
                    "r[#r + 1] = tostring(a) .. tostring(b) if #r > 50 then break end end "
                    "return table.concat(r, ',') end)()" % (subject, pat))
        if k == 4:
            return "tostring(string.find(%s, %s, 1, true))" % (subject, self.str_expr(d))
        return "tostring(string.find(%s, string.rep('x', %s) .. 'y', 1, true))" % (
            subject, self.s.pick(["10", "1000", "1e5", "2e5"]))

    def function(self, d: int) -> str:
        self.nfun += 1
        return "function(...) %s return %s end" % (self.block(d, 3), self.any_expr(d))

    def code_string(self, d: int) -> str:
        if self.s.chance(1, 3):
            return self.literal()  # random bytes as Lua source
        return lua_quote(("return " + self.s.pick(["...", "(...):upper()", "#...",
                                                  "string.rep(..., 3)", "error(...)",
                                                  "txn", "hs.now()", "x.y",
                                                  "(function() while true do end end)()"])
                          ).encode())

    # ---- ctx ----

    def ctx_key(self, d: int) -> str:
        k = self.s.below(10)
        if k < 5:
            return lua_quote(self.s.pick([b"s", b"n", b"t", b"a", b"1", b"true"]))
        if k == 5:
            return self.literal()
        if k == 6:
            return self.s.pick(["1", "2", "1.5", "-0.0", "2^53", "2^63", "0/0", "-1"])
        if k == 7:
            return self.s.pick(["true", "false"])
        if k == 8:
            return self.s.pick(["{}", "print", "txn.ctx"])
        return self.str_expr(d)

    def ctx_value(self, d: int) -> str:
        return self.choose([
            lambda d: self.number(),
            lambda d: self.str_expr(d),
            lambda d: self.s.pick(["true", "false", "nil", "{}"]),
            lambda d: self.table_expr(d),
            lambda d: self.s.pick([
                "function() end", "coroutine.create(print)", "txn.ctx", "txn", "hs",
                "setmetatable({}, {__index = function() return 1 end})",
                "setmetatable({a = 1}, {__pairs = function() error('pairs') end})",
                "(function() local t = {} for i = 1, %s do t = {t} end return t end)()" % self.count(),
                "(function() local s = {string.rep('x', 1000)} local t = {} for i = 1, %s do "
                "t[i] = s end return t end)()" % self.count(),
                "(function() local t = {} t.self = t return t end)()",
                "string.rep('c', %s)" % self.count(),
                "{[{}] = 1}", "{[print] = 1}", "{[1] = 1, [2] = 2, [4] = 4}", "{[true] = 1, [1] = 2}",
                "{[1] = 'a', ['1'] = 'b'}", "{[-0.0] = 1}", "{[2^63] = 1}", "{1, nil, 3}"]),
        ], d)

    # ---- statements ----

    def block(self, d: int, maxn: int = 4) -> str:
        return "\n".join(self.stmt(d) for _ in range(self.s.below(maxn + 1)))

    def hdrs(self) -> str:
        return self.s.pick(["txn.req.headers", "txn.resp.headers"])

    def header_value(self, d: int) -> str:
        k = self.s.below(8)
        if k < 4:
            return self.str_expr(d)
        if k == 4:
            return self.number()
        if k == 5:
            return "{%s}" % ", ".join(self.str_expr(d) for _ in range(self.s.below(4)))
        if k == 6:
            return "nil"
        return self.s.pick(["true", "{{}}", "function() end", "{1, true}", "txn", "{[3] = 'x'}"])

    def field(self, names: Sequence[str]) -> str:
        name = self.s.pick(names)
        if name == "headers" and "headers-assign" in self.avoid:
            return "x"  # known finding: the assignment replaces the proxy for later fires
        return name

    def rawset_target(self) -> str:
        target = self.s.pick(["txn", "txn.req", "txn.resp", "txn.req.headers", "txn.resp.headers"])
        if "proxy-rawset" in self.avoid:
            return "{}"  # known finding: rawset on the reused proxies leaks across fires
        return target

    def stmt(self, d: int) -> str:
        return self.choose([
            lambda d: "txn.resp.headers[%s] = %s" % (self.name(d), self.str_expr(d)),
            lambda d: "%s[%s] = %s" % (self.hdrs(), self.name(d), self.header_value(d)),
            lambda d: "%s:%s(%s, %s)" % (self.hdrs(), self.s.pick(["add", "set"]), self.name(d),
                                         self.header_value(d)),
            lambda d: "%s:remove(%s)" % (self.hdrs(), self.name(d)),
            lambda d: "v%d = %s" % (self.s.below(3), self.str_expr(d)),
            lambda d: "for n, v in %s:each() do\n%s\nend" % (self.hdrs(), self.block(d, 3)),
            lambda d: "local all = %s:get_all(%s) for i = 1, #all do %s end" % (
                self.hdrs(), self.name(d), self.stmt(d)),
            lambda d: "txn.req.%s = %s" % (self.field(["method", "uri", "method", "uri", "headers",
                                                       "body", "x"]), self.str_expr(d)),
            lambda d: "txn.resp.status = %s" % self.s.pick(STATUS),
            lambda d: "txn.resp.body = %s" % self.str_expr(d),
            lambda d: "txn.resp.%s = %s" % (self.field(["headers", "x", "status", "body"]),
                                            self.any_expr(d)),
            lambda d: self.respond(d),
            lambda d: "do return %s end" % self.s.pick(["hs.DONE", "nil", "1", "txn:respond(204)",
                                                       "error('x')"]),
            lambda d: "txn.ctx[%s] = %s" % (self.ctx_key(d), self.ctx_value(d)),
            lambda d: "txn.ctx.%s = %s" % (self.s.pick(["s", "n", "t"]), self.ctx_value(d)),
            lambda d: "txn.ctx = %s" % self.s.pick(["{}", "{s = 'x'}", "5", "nil", "txn.ctx",
                                                   "{txn.ctx}", "'ctx'"]),
            lambda d: "local c = txn.ctx c.n = (tonumber(c.n) or 0) + 1",
            lambda d: "hs.log.%s(%s)" % (self.s.pick(LEVELS), ", ".join(
                self.any_expr(d) for _ in range(self.s.below(4)))),
            lambda d: "print(%s)" % ", ".join(self.any_expr(d) for _ in range(self.s.below(3))),
            lambda d: "for i = 1, %s do hs.log.info(%s) end" % (self.count(), self.str_expr(d)),
            lambda d: "pcall(function()\n%s\nend)" % self.block(d),
            lambda d: "local ok, e = pcall(%s, %s)" % (self.fn(self.s.pick([
                "error", "string.rep", "tostring", "txn.respond", "hs.log.info", "coroutine.wrap",
                "load", "next", "setmetatable"])), self.any_expr(d)),
            lambda d: "xpcall(function()\n%s\nend, function(e)\n%s\nreturn e end)" % (
                self.block(d), self.block(d, 2)),
            lambda d: self.raise_error(d),
            lambda d: "for i = 1, %s do\n%s\nend" % (self.count(), self.block(d, 3)),
            lambda d: self.s.pick(["while true do end",
                                   "local i = 0 while true do i = i + 1 end",
                                   "local function f() return f() end f()",
                                   "for i = 1, 1e15 do end",
                                   "local t = {} for i = 1, 1e9 do t[i] = i end",
                                   "local s = 'x' while true do s = s .. s end",
                                   "local t = {} while true do t[#t + 1] = tostring(#t) end",
                                   "local function r() return 1 + r() end r()",
                                   "local function r(n) if n <= 0 then return 0 end return 1 + r(n - 1) end r(%s)" % self.count(),
                                   "local co co = coroutine.wrap(function() co() end) co()",
                                   "string.rep('x', 2^31)",
                                   "local t = {} for i = 1, 100 do t[i] = string.rep('y', 1e5) .. i end",
                                   "table.concat(setmetatable({}, {__index = function() return 'x' end}), '', 1, 1e8)",
                                   "table.unpack({}, 1, 1e8)",
                                   "table.sort({3, 1, 2}, function() return true end)",
                                   "local t = {} for i = 1, 1e5 do t[i] = -i end table.sort(t)",
                                   "string.rep('x', 1e7):upper()",
                                   "collectgarbage()", "collectgarbage('count')", "collectgarbage('stop')",
                                   "setmetatable({}, {__gc = print})",
                                   "select(-1)", "tostring(nil .. 'x')", "undeclared_global = 1",
                                   "local _ = undeclared_global", "math.randomseed(1)",
                                   "string.dump(print)", "string.x = 1", "require('hs.util')",
                                   "require('nope')", "require('../etc/passwd')"]).replace(
                                       "require(", self.fn("require") + "("),
            lambda d: self.reentry(),
            lambda d: "local t2 = {} table.move(%s, %s, %s, %s, t2)" % (
                self.s.pick(["{}", "{1, 2, 3}", "txn.req.headers:get_all('x-a')"]),
                self.c_start(["1", "-2^53", "0", "2^62"]), self.c_count(), self.number()),
            lambda d: "local i = 0 repeat i = i + 1\n%s\nuntil i >= %s" % (self.block(d, 2),
                                                                           self.count()),
            lambda d: "if %s then\n%s\nelse\n%s\nend" % (self.any_expr(d), self.block(d, 2),
                                                          self.block(d, 2)),
            lambda d: self.coroutine(d),
            lambda d: "coroutine.yield(%s)" % self.any_expr(d),
            lambda d: "local f = %s(%s) if f then f(%s) end" % (self.fn("load"), self.code_string(d),
                                                                   self.any_expr(d)),
            lambda d: "rawset(%s, %s, %s)" % (self.rawset_target(), self.name(d), self.ctx_value(d)),
            lambda d: "local _ = rawget(%s, %s)" % (self.s.pick(["txn", "txn.req", "txn.req.headers",
                                                                 "txn.ctx"]), self.name(d)),
            lambda d: self.s.pick(["setmetatable(txn, nil)", "setmetatable(txn.req.headers, {})",
                                   "setmetatable(txn.ctx, {__index = function() error('idx') end})",
                                   "local _ = getmetatable(txn)", "local _ = getmetatable('')",
                                   "local _ = next(txn)", "for k in pairs(txn) do end",
                                   "for k, v in pairs(txn.req.headers) do end",
                                   "local _ = #txn.req.headers",
                                   "local _ = txn.req.headers == txn.resp.headers",
                                   "SAVED_TXN = txn", "SAVED_ITER = txn.req.headers:each()",
                                   "SAVED_HDRS = txn.resp.headers",
                                   "if SAVED_TXN then local _ = SAVED_TXN.req.headers.host end",
                                   "if SAVED_ITER then SAVED_ITER() end",
                                   "if SAVED_HDRS then SAVED_HDRS['x-saved'] = 'y' end",
                                   "self.n = (self.n or 0) + 1",
                                   "txn.respond(nil, 200)", "txn:respond()",
                                   "txn.req.headers.get(nil, 'host')",
                                   "local f = txn.req.headers.each local it = f() it()"]),
        ], d)

    # Lua code that C library functions call back (gsub, tostring, sort, metamethods,
    # pcall, coroutines), calling itself through them: the C stack grows per level.
    REENTRY = [
        "local function f(s) {G} return (string.gsub(s, '.', f)) end f('ab')",
        "local f f = function(s) {G} return (s:gsub('%w', {{}}, 1) .. s:gsub('.', f)) end f('xy')",
        "local t t = setmetatable({{}}, {{__tostring = function() {G} return tostring(t) end}}) local _ = tostring(t)",
        "local t t = setmetatable({{}}, {{__index = function(_, k) {G} return t[k] end}}) local _ = t.x",
        "local t t = setmetatable({{}}, {{__concat = function(a, b) {G} return t .. 'x' end}}) local _ = t .. 'y'",
        "local function r() {G} return pcall(r) end r()",
        "local function r() {G} return select(2, xpcall(r, function(e) return e end)) end r()",
        "local function r() {G} return coroutine.wrap(r)() end r()",
        "local function c(a, b) {G} table.sort({{3, 2, 1}}, c) return a < b end table.sort({{3, 2, 1}}, c)",
        "local function r() {G} return tostring(setmetatable({{}}, {{__tostring = r}})) end r()",
        "local function r() {G} return (load('return ...'))(r()) end r()",
        "local function r() {G} local ok, e = pcall(string.rep, setmetatable({{}}, {{__tostring = r}})) return e end r()",
        "local h h = function() {G} return txn.req.headers:get_all(h()) end h()",
        "local function r(s) {G} return (s:gsub('.', function(c) return r(c) end)) end r('a')",
    ]

    def reentry(self) -> str:
        code = self.s.pick(self.REENTRY).replace("(load(", "(" + self.fn("load") + "(")
        guard = ""
        if "luajit-cstack" in self.avoid:  # known finding: LuaJIT runs out of C stack
            guard = "DEPTH = (DEPTH or 0) + 1 if DEPTH > 150 then return '' end"
        return "do local DEPTH = 0 " + code.format(G=guard) + " end"

    def coroutine(self, d: int) -> str:
        self.in_coroutine += 1
        body = (self.block(d, 2), self.any_expr(d), self.block(d, 2))
        self.in_coroutine -= 1
        return ("local co = coroutine.wrap(function(...)\n%s\ncoroutine.yield(%s)\n%s\nend)"
                "\nco(%s) co()" % (*body, self.any_expr(d)))

    def fn(self, name: str) -> str:
        """NAME, or a stand-in where calling it is a known finding."""
        if name in ("load", "require") and self.in_coroutine and "coroutine-load" in self.avoid:
            return "NO_" + name.upper()  # known finding: load/require in a coroutine
        return name

    def respond(self, d: int) -> str:
        args = [self.s.pick(STATUS)]
        if self.s.chance(3, 4):
            args.append(self.str_expr(d))
        if self.s.chance(1, 2):
            pairs = ["[%s] = %s" % (self.name(d), self.header_value(d))
                     for _ in range(self.s.below(4))]
            args.append("{%s}" % ", ".join(pairs) if self.s.chance(3, 4) else self.any_expr(d))
        return "txn:respond(%s)" % ", ".join(args)

    def raise_error(self, d: int) -> str:
        return "error(%s)" % self.s.pick([
            self.str_expr(d), "nil", "{}", "42", "true", "txn", "coroutine.create(print)",
            "setmetatable({}, {__tostring = function() return %s end})" % self.any_expr(d),
            "setmetatable({}, {__tostring = function() error('in tostring') end})",
            "setmetatable({}, {__tostring = function() while true do end end})",
            "setmetatable({}, {__tostring = function() return string.rep('t', 1e7) end})",
            "%s, %s" % (self.str_expr(d), self.number()),
            "string.rep('e', %s)" % self.count()])

    # ---- the script ----

    def script(self) -> Tuple[str, List[str], bool]:
        """(source, hooks it handles, whether it returns the class itself). The first statement of every handler is the
        probe guard: a transaction with PROBE_HEADER only sets txn.ctx.probe."""
        s = self.s
        lines = ["local C = {}", "local SAVED_TXN, SAVED_ITER, SAVED_HDRS",
                 "local function NO_LOAD() return nil, 'avoided' end",
                 "local function NO_REQUIRE() return nil end"]
        if s.chance(1, 4):
            lines.append("function C.new() return {n = 0} end")
        if s.chance(1, 16):
            lines.append(self.s.pick(["error('at load')", "undeclared = 1",
                                      "local x = " + self.literal(), "hs.log.warn('loading')",
                                      "C.on_read_request = 5", "function C:on_bogus(txn) end",
                                      "string.rep('x', 1e8)", "while true do end",
                                      self.literal()[1:-1]]))  # raw bytes as code: usually a syntax error
        handled = []
        for hook in HOOKS:
            if not s.chance(1, 2):
                continue
            handled.append(hook)
            lines.append("function C:on_%s(txn)" % hook)
            lines.append("  if txn.req.headers[%s] then txn.ctx.probe = true return end"
                         % lua_quote(PROBE_HEADER.encode()))
            lines.append("  local v0, v1, v2 = %s, %s, %s" % (self.literal(), self.literal(),
                                                              self.str_expr(1)))
            lines.append(self.block(4, 8))
            lines.append("end")
        ret = self.s.pick(["return C"] * 12 + ["return 5", "return nil",
                                                "return setmetatable({}, {__index = C})",
                                                "return C, 1"])
        lines.append(ret)
        return "\n".join(lines) + "\n", handled, ret in ("return C", "return C, 1")


# ---- Python-side inputs ----

class UserCodeError(Exception):
    """Raised by our own objects' methods: hostscript may pass it on as it is."""


class Unprintable:
    """A header value whose str() raises: what a bad argument may do."""

    def __str__(self) -> str:
        raise UserCodeError("str() of a header value")


def py_text(s: Source, pool: Sequence[str], maxlen: int = 16) -> Any:
    """A header name/value, method, URI: str, bytes, or a wrong type."""
    k = s.below(12)
    if k < 5:
        return s.pick(pool)
    if k < 7:
        return s.text_bytes(maxlen).decode("latin-1")
    if k < 9:
        return bytes(s.text_bytes(maxlen))
    if k == 9:
        return s.blob(maxlen)
    if k == 10:
        return s.pick(["caf\u00e9", "\u20ac", "\udc80", "a\x00b", "x" * 5000])
    return s.pick([None, 1, 1.5, b"", bytearray(b"x-a"), memoryview(b"v"), ["x"], Unprintable()])


VALUES = ["1", "v", "", " padded ", "a\tb", "a\r\nb", "a\x00b", "\x7f", "\xe9", "x" * 300]


def header_source(s: Source) -> Any:
    k = s.below(10)
    if k < 4:
        return [(py_text(s, NAMES), py_text(s, VALUES)) for _ in range(s.below(5))]
    if k < 7:  # a raw block
        lines = []
        for _ in range(s.below(5)):
            name = s.pick([b"Host", b"X-A", b"x-a", b"Bad Name", b"", b" x", b"x:"]) \
                if s.chance(3, 4) else s.text_bytes(8)
            sep = s.pick([b": ", b":", b":  ", b" : ", b"", b":\t"])
            value = s.text_bytes(12)
            end = s.pick([b"\r\n", b"\n", b"\r\n", b"\r", b"", b"\r\n "])
            lines.append(name + sep + value + end)
        block = b"".join(lines)
        if s.chance(1, 2):
            block += s.pick([b"\r\n", b"\n", b"\r\n\r\nGET / HTTP/1.1\r\n", b"", b"\x00"])
        return s.pick([block, block, bytearray(block), memoryview(block)])
    if k == 7:
        out = {}
        for _ in range(s.below(4)):
            name = py_text(s, NAMES)
            try:
                hash(name)
            except TypeError:
                name = repr(name)
            out[name] = py_text(s, VALUES)
        return out
    if k == 8:
        msg = email.message.Message()
        for _ in range(s.below(4)):
            n, v = s.pick(NAMES), s.pick(VALUES)
            try:
                msg[n] = v
            except Exception:  # email's own refusal is not ours to judge
                pass
        return msg
    return s.pick([[("a",)], [1, 2], "Host: x", 5, [("a", "b", "c")], iter([("x-a", "1")]),
                   (("x-a", "1"), ("x-b", "2")), [["x-a", "1"]], None])


def py_value(s: Source, d: int) -> Any:
    """A ctx value: mostly plain data, sometimes what ctx refuses."""
    k = s.below(16) if d > 0 else s.below(8)
    if k == 0:
        return s.text_bytes(12).decode("latin-1")
    if k == 1:
        return s.blob(12)
    if k == 2:
        return s.pick([0, 1, -1, 2 ** 31, 2 ** 53, 2 ** 53 + 1, 2 ** 63 - 1, -2 ** 63, 2 ** 63,
                       2 ** 64, -2 ** 64, 10 ** 30])
    if k == 3:
        return s.pick([0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), 1.0, 2.0 ** 53])
    if k == 4:
        return s.pick([True, False, None])
    if k == 5:
        return s.pick(["", "\x00", "\udc80", "caf\u00e9", "\u20ac", "x" * 1000])
    if k == 6:
        return s.pick([b"", b"\xff\xfe", bytearray(b"ba"), memoryview(b"mv")])
    if k == 7:
        return s.pick([object(), {1, 2}, print, 1j, type, frozenset()])
    if k < 11:
        return [py_value(s, d - 1) for _ in range(s.below(4))]
    if k == 11:
        return tuple(py_value(s, d - 1) for _ in range(s.below(3)))
    if k < 14:
        return {py_key(s): py_value(s, d - 1) for _ in range(s.below(4))}
    if k == 14:
        v: Any = [1]
        for _ in range(s.pick([10, 31, 32, 33, 40, 200])):
            v = [v]
        return v
    cyc: list = []
    cyc.append(cyc)
    return s.pick([cyc, {"big": "x" * (9 << 20)}, ["x" * 1000] * 9000])


def py_key(s: Source) -> Any:
    return s.pick(["s", "n", "t", "a", "1", "true", b"s", b"a", 1, 2, 1.5, -0.0, True, False,
                   None, (1, 2), 2 ** 63, float("nan"), "\udc80", "\u20ac"])


def py_ctx(s: Source) -> Any:
    if s.chance(1, 8):
        return py_value(s, 2)  # not necessarily a dict
    return {py_key(s): py_value(s, 3) for _ in range(s.below(5))}
