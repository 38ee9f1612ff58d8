"""``hostscript check``: a static checker for handler scripts (docs/check.md).

Every problem is reported as ``file:line: message``:

- what the engine's compiler says (syntax errors), per engine checked;
- what loading the script in a throw-away host says: the chunk raised an error, it
  returned no handler class, ``new`` failed. The class is then inspected by the
  script run inside a small Lua wrapper (same line numbers), so that *every*
  ``on_<hook>`` of an undeclared hook and every non-function ``on_<hook>`` is
  reported, not only the first one the core meets;
- globals read or written: the sandbox's strict-globals rule, found statically in
  the Lua 5.4 bytecode listing (``luac5.4 -p -l -l``: GETTABUP/SETTABUP on the
  ``_ENV`` upvalue with a constant key), whatever the engine checked — a handler
  that reads an undeclared global fails only when it fires, this finds it now.
  Names the sandbox provides (native/sandbox.c) are allowed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .errors import ScriptError

# the sandbox's safe globals (native/sandbox.c, hs_sandbox_open): base_names, then
# what it adds itself; the environment of a script has _G too
COMMON_GLOBALS = frozenset({
    "assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "select",
    "setmetatable", "getmetatable", "tonumber", "tostring", "type", "_VERSION", "pcall",
    "xpcall", "load", "require", "hs", "string", "table", "math", "coroutine",
    "os", "collectgarbage", "rawset", "print", "_G"})
ENGINE_GLOBALS = {
    "luajit": COMMON_GLOBALS | {"unpack", "bit"},
    "lua54": COMMON_GLOBALS | {"rawlen", "utf8"},
}

LUAC = "luac5.4"

# the script runs as the body of a function called by this one, which reports the
# class's on_* keys and their types in an error (nothing is published); it is all
# on the script's first line, so line numbers are the script's own
_MARK = "<hscheck>"
_WRAP_HEAD = ("return (function(c, ...) if type(c) ~= 'table' then return c end "
              "local r = {} for k, v in pairs(c) do if type(k) == 'string' and "
              "k:sub(1, 3) == 'on_' then r[#r + 1] = k .. '=' .. type(v) end end "
              f"error('{_MARK}' .. table.concat(r, ','), 0) end)((function(...) ")
_WRAP_TAIL = "\nend)(...))"

_INSN = re.compile(r"^\t(\d+)\t\[(\d+)\]\t(\w+)\s*\t?(.*)$")
_COMMENT_KEY = re.compile(r'^(\S+) "((?:[^"\\]|\\.)*)"')
_GLOBAL_ERR = re.compile(r"^(?:assignment to )?undeclared global '([^']*)'")


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class UsageProblem(Exception):
    """A command-line argument the check cannot take (exit status 2)."""


def expand(paths: Iterable[str]) -> List[str]:
    """The files to check: files as given, directories as every *.lua inside them,
    recursively, sorted. A missing path, or a directory without scripts, is a
    UsageProblem."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(p)
                           for f in files if f.endswith(".lua"))
            if not found:
                raise UsageProblem(f"no .lua files in directory {p}")
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise UsageProblem(f"no such file or directory: {p}")
    seen: Set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


# ---- the Lua 5.4 listing ----

@dataclass
class Listing:
    accesses: List[Tuple[int, str, str]]   # (line, "read"|"written", name) on _ENV
    fields: Dict[str, int]                 # on_* field name -> first line it is set
    main_return: Optional[int]             # line of main's last return with values / its end


def luac_available() -> bool:
    return shutil.which(LUAC) is not None


def listing(source: bytes) -> Tuple[Optional[Listing], Optional[str]]:
    """Compile SOURCE with luac5.4 and read its listing: (Listing, None), or
    (None, luac's error) when Lua 5.4 does not compile it."""
    try:
        p = subprocess.run([LUAC, "-p", "-l", "-l", "-"], input=source, capture_output=True,
                           timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{LUAC} failed: {exc}"
    if p.returncode != 0:
        msg = p.stderr.decode("utf-8", "replace").strip()
        return None, msg.split(": ", 1)[-1] if msg.startswith(LUAC) else msg
    accesses: List[Tuple[int, str, str]] = []
    fields: Dict[str, int] = {}
    in_main = False
    main_returns: List[Tuple[int, str]] = []
    for raw in p.stdout.decode("utf-8", "replace").splitlines():
        if raw.startswith("main <"):
            in_main = True
            continue
        if raw.startswith("function <"):
            in_main = False
            continue
        m = _INSN.match(raw)
        if not m:
            continue
        line, op, rest = int(m.group(2)), m.group(3), m.group(4)
        comment = rest.split("\t; ", 1)[1] if "\t; " in rest else ""
        if in_main and op.startswith("RETURN"):
            main_returns.append((line, comment))
        if op in ("GETTABUP", "SETTABUP"):
            k = _COMMENT_KEY.match(comment)
            if k and k.group(1) == "_ENV":
                accesses.append((line, "read" if op == "GETTABUP" else "written", k.group(2)))
            elif k and op == "SETTABUP" and k.group(2).startswith("on_"):
                fields.setdefault(k.group(2), line)
        elif op in ("SETFIELD", "SETTABLE"):
            k = re.match(r'^"((?:[^"\\]|\\.)*)"', comment)
            if k and k.group(1).startswith("on_"):
                fields.setdefault(k.group(1), line)
    main_return = None
    if main_returns:
        # the last instruction is the implicit "return" the compiler always adds
        valued = [ln for ln, c in main_returns[:-1] if c and not c.startswith("0 out")]
        main_return = valued[-1] if valued else main_returns[-1][0]
    return Listing(accesses, fields, main_return), None


def global_problems(path: str, lst: Listing, engines: Sequence[str]) -> List[Problem]:
    out = []
    for line, how, name in lst.accesses:
        if how == "written":
            if name != "_G":  # the environment's own field; anything else hits __newindex
                out.append(Problem(path, line, f"global '{name}' written (use local)"))
            continue
        missing = [e for e in engines if name not in ENGINE_GLOBALS[e]]
        if len(missing) == len(engines):
            out.append(Problem(path, line, f"global '{name}' read"))
        elif missing:
            out.append(Problem(path, line, f"global '{name}' read (not in {', '.join(missing)})"))
    return out


# ---- the engines ----

def _strip_position(message: str, path: str) -> Tuple[Optional[int], str]:
    """'path:12: msg' -> (12, 'msg'); 'path: msg' -> (None, 'msg')."""
    m = re.match(re.escape(path) + r":(\d+): (.*)$", message, re.S)
    if m:
        return int(m.group(1)), m.group(2)
    if message.startswith(path + ": "):
        return None, message[len(path) + 2:]
    return None, message


def _line_of(name: str, lst: Optional[Listing], source: str) -> int:
    if lst and name in lst.fields:
        return lst.fields[name]
    for i, text in enumerate(source.splitlines(), 1):
        if re.search(r"\b" + re.escape(name) + r"\b", text):
            return i
    return 1


def engine_problems(host_factory, path: str, source: bytes, lst: Optional[Listing],
                    hooks: Sequence[str]) -> List[Problem]:
    """What loading SOURCE in hosts made by host_factory(sandbox=...) reports."""
    text = source.decode("utf-8", "replace")
    nlines = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
    statics = {(ln, name) for ln, _, name in (lst.accesses if lst else [])}
    out: List[Problem] = []
    with host_factory(sandbox=True) as host:
        try:
            host.load(source, path)
            return []  # the core found nothing; a later fire may (globals: see above)
        except ScriptError as e:
            first = e
    line, msg = _strip_position(first.message, path)
    if first.kind == "syntax":
        return [Problem(path, line or 1, msg)]
    if first.kind in ("timeout", "memory"):  # running it again would only take as long
        return [Problem(path, line or 1, msg)]
    if line is not None and re.match(r"\S+#\S+: ", msg):  # a class hs.register added, at its call
        return [Problem(path, line, msg)]
    hook_error = " handles an undeclared hook " in msg or re.match(r"on_\w+ must be a function", msg)
    chunk_error = line is not None
    if not hook_error:
        if chunk_error:
            g = _GLOBAL_ERR.match(msg)
            if not (g and (line, g.group(1)) in statics):
                out.append(Problem(path, line, msg))
        elif msg.startswith("the script must return a handler class"):
            out.append(Problem(path, lst.main_return if lst and lst.main_return else nlines, msg))
            return out
        else:
            out.append(Problem(path, line or (lst.main_return if lst and lst.main_return else 1), msg))
    # the class, all of it: by the wrapper; past a chunk error only without the sandbox
    # (an undeclared global is what usually stops a chunk, and it is reported above)
    wrapped = _WRAP_HEAD.encode() + source + _WRAP_TAIL.encode()
    keys: Optional[List[Tuple[str, str]]] = None
    for sandbox in ((True, False) if chunk_error else (True,)):
        with host_factory(sandbox=sandbox) as host:
            try:
                host.load(wrapped, path)
            except ScriptError as e:
                if e.message.startswith(_MARK):
                    body = e.message[len(_MARK):]
                    keys = [tuple(kv.split("=", 1)) for kv in body.split(",") if kv]  # type: ignore[misc]
                    break
    declared = set(hooks)
    for key, kind in sorted(keys or []):
        hook = key[3:]
        if hook not in declared:
            out.append(Problem(path, _line_of(key, lst, text),
                               f"{key} handles an undeclared hook '{hook}' "
                               f"(declared hooks: {', '.join(hooks)})"))
        elif kind != "function":
            out.append(Problem(path, _line_of(key, lst, text), f"{key} must be a function, not {kind}"))
    if keys is None and hook_error:  # the wrapper could not tell: the core's word
        key = msg.split(" ", 1)[0]
        out.append(Problem(path, _line_of(key, lst, text), msg))
    return out


def check_file(path: str, hooks: Sequence[str], engines: Sequence[str], make_host,
               use_luac: bool = True) -> Tuple[List[Problem], List[str]]:
    """Problems of one file, and notes (printed, not failures)."""
    notes: List[str] = []
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        return [Problem(path, 1, f"cannot read the script: {exc.strerror or exc}")], notes
    lst: Optional[Listing] = None
    luac_error = None
    if use_luac:
        lst, luac_error = listing(source)
    per_engine: Dict[Problem, List[str]] = {}
    for eng in engines:
        for p in engine_problems(lambda sandbox, eng=eng: make_host(eng, sandbox), path, source,
                                 lst, hooks):
            per_engine.setdefault(p, []).append(eng)
    problems: Set[Problem] = set()
    for p, engs in per_engine.items():
        if len(engs) < len(engines):
            p = Problem(p.path, p.line, f"{p.message} [{', '.join(engs)}]")
        problems.add(p)
    if lst is not None:
        problems.update(global_problems(path, lst, engines))
    elif luac_error and not problems:  # compiles for the engines checked, not for Lua 5.4
        notes.append(f"{path}: note: no global analysis: Lua 5.4 does not compile it "
                     f"({luac_error.replace('stdin:', 'line ', 1)})")
    return sorted(problems), notes


def locate(path: str, message: str) -> Optional[int]:
    """The line a class-level load error of the script in PATH is about (no class
    returned, an on_<hook> problem), from the Lua 5.4 listing; None when unknown."""
    if not luac_available():
        return None
    try:
        with open(path, "rb") as f:
            source = f.read()
        lst, _ = listing(source)
    except (OSError, subprocess.SubprocessError):
        return None
    if lst is None:
        return None
    if message.startswith("the script must return a handler class"):
        return lst.main_return
    m = re.match(r"(on_\w+) ", message)
    return _line_of(m.group(1), lst, source.decode("utf-8", "replace")) if m else None
