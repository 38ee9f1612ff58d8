"""`hostscript check` as a static checker: every problem as file:line: message, exit
1 for problems and 2 for usage errors; globals from the Lua 5.4 listing (luac5.4,
Debian's lua5.4, installed by tools/install-deps.sh)."""
from __future__ import annotations

import pathlib
import re
import shutil
import time

import pytest

import hostscript
from hostscript import check as check_mod
from hostscript.cli import main

pytestmark = pytest.mark.skipif(shutil.which("luac5.4") is None,
                                reason="luac5.4 missing: run tools/install-deps.sh (Debian lua5.4)")

HOOKS = "read_request,log"
DECLARED = "(declared hooks: read_request, log)"

SCRIPTS = {
    "good.lua": (
        "local C = {}\n"
        "local count = 0\n"
        "function C:on_read_request(txn)\n"
        "  count = count + 1\n"
        "  txn.ctx.n = tostring(count) .. string.rep('x', 2)\n"
        "  if txn.req.headers['x-deny'] then return txn:respond(403, 'no') end\n"
        "end\n"
        "function C:on_log(txn) hs.log.info(txn.req.uri, math.floor(hs.now())) end\n"
        "return C\n"),
    "syntax.lua": (
        "local C = {}\n"
        "function C:on_log(txn)\n"
        "  if then end\n"
        "end\n"
        "return C\n"),
    "noclass.lua": (
        "local C = {}\n"
        "function C:on_log(txn) end\n"
        "return 42\n"),
    "hooks.lua": (
        "local C = {}\n"
        "function C:on_read_request(txn) end\n"
        "function C:on_foo(txn) end\n"
        "C.on_log = 'not a function'\n"
        "function C:on_bar(txn) end\n"
        "return C\n"),
    "globals.lua": (
        "local C = {}\n"
        "function C:on_read_request(txn)\n"
        "  seen = (seen or 0) + 1\n"
        "  txn.ctx.v = helper(txn)\n"
        "end\n"
        "function C:on_log(txn)\n"
        "  print(string.format('%d', #txn.req.uri), os.time(), pairs, ipairs)\n"
        "end\n"
        "return C\n"),
    "registers.lua": (
        "local A = {}\n"
        "function A:on_log(txn) end\n"
        "hs.register(A, {name = 'a'})\n"
        "local B = {}\n"
        "function B:on_zip(txn) end\n"
        "hs.register(B, {name = 'b'})\n"),
    "sub/dir/chunk.lua": (
        "local C = {}\n"
        "total = 0\n"
        "function C:on_zap(txn) end\n"
        "return C\n"),
}

EXPECTED = {
    "syntax.lua": ["3: unexpected symbol near 'then'"],
    "registers.lua": [f"6: {{dir}}/registers.lua#b: on_zip handles an undeclared hook 'zip' {DECLARED}"],
    "noclass.lua": ["3: the script must return a handler class (a table) or register one with hs.register, not number"],
    "hooks.lua": [f"3: on_foo handles an undeclared hook 'foo' {DECLARED}",
                  "4: on_log must be a function, not string",
                  f"5: on_bar handles an undeclared hook 'bar' {DECLARED}"],
    "globals.lua": ["3: global 'seen' read",
                    "3: global 'seen' written (use local)",
                    "4: global 'helper' read"],
    "sub/dir/chunk.lua": ["2: global 'total' written (use local)",
                          f"3: on_zap handles an undeclared hook 'zap' {DECLARED}"],
}


def write(root: pathlib.Path, scripts: dict) -> None:
    for name, text in scripts.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def run(capsys, *args: str):
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def expected_lines(root: pathlib.Path, expected: dict) -> list:
    return sorted(f"{root / name}:{msg}".replace("{dir}", str(root))
                  for name, msgs in expected.items() for msg in msgs)


@pytest.mark.parametrize("engine_arg", ["luajit", "lua54"])
def test_a_directory_reports_every_problem_with_its_line(capsys, tmp_path, engine_arg):
    write(tmp_path, SCRIPTS)
    code, out, err = run(capsys, "--engine", engine_arg, "--hooks", HOOKS, str(tmp_path))
    assert code == 1
    assert out.splitlines() == [f"{tmp_path / 'good.lua'}: ok"]
    assert sorted(err.splitlines()) == expected_lines(tmp_path, EXPECTED)


@pytest.mark.parametrize("engine_arg", ["luajit", "lua54"])
def test_good_scripts_pass_with_exit_0(capsys, tmp_path, engine_arg):
    write(tmp_path, {"a.lua": SCRIPTS["good.lua"], "b/c.lua": SCRIPTS["good.lua"]})
    code, out, err = run(capsys, "--engine", engine_arg, "--hooks", HOOKS, str(tmp_path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"{tmp_path / 'a.lua'}: ok", f"{tmp_path / 'b/c.lua'}: ok"]


def test_both_engines_tag_what_only_one_of_them_reports(capsys, tmp_path):
    write(tmp_path, {
        "const.lua": "local C = {}\nlocal x <const> = 1\nfunction C:on_log(txn) end\nreturn C\n",
        "unpack.lua": "local C = {}\nfunction C:on_log(txn)\n  return unpack({1})\nend\nreturn C\n",
        "bit.lua": "local C = {}\nfunction C:on_log(txn)\n  return bit.band(1, utf8.char(65))\nend\nreturn C\n",
    })
    code, out, err = run(capsys, "--engine", "luajit", "--engine", "lua54", "--hooks", HOOKS,
                         str(tmp_path))
    assert code == 1
    assert sorted(err.splitlines()) == sorted([
        f"{tmp_path / 'const.lua'}:2: unexpected symbol near '<' [luajit]",
        f"{tmp_path / 'unpack.lua'}:3: global 'unpack' read (not in lua54)",
        f"{tmp_path / 'bit.lua'}:3: global 'bit' read (not in lua54)",
        f"{tmp_path / 'bit.lua'}:3: global 'utf8' read (not in luajit)",
    ])
    # one engine alone: what it lacks is simply an undeclared global
    code, out, err = run(capsys, "--engine", "lua54", "--hooks", HOOKS, str(tmp_path / "unpack.lua"))
    assert (code, err.strip()) == (1, f"{tmp_path / 'unpack.lua'}:3: global 'unpack' read")
    code, out, err = run(capsys, "--engine", "lua54", "--hooks", HOOKS, str(tmp_path / "const.lua"))
    assert (code, err) == (0, "")


def test_a_chunk_error_is_reported_once_with_the_class_problems(capsys, tmp_path):
    # the core stops at `x.y = 1` (indexing nil); the class is still inspected
    write(tmp_path, {"c.lua": "local C = {}\nlocal x\nx.y = 1\nfunction C:on_nope() end\nreturn C\n"})
    code, out, err = run(capsys, "--engine", "lua54", "--hooks", HOOKS, str(tmp_path))
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'c.lua'}:3: attempt to index")
    # without the sandbox the chunk fails the same way: no class to inspect, nothing made up


def test_a_script_lua54_cannot_compile_is_checked_by_luajit_with_a_note(capsys, tmp_path):
    write(tmp_path, {"ll.lua": "local C = {}\nlocal big = 1LL\nfunction C:on_log(txn) end\nreturn C\n"})
    code, out, err = run(capsys, "--engine", "luajit", "--hooks", HOOKS, str(tmp_path))
    assert code == 0
    assert err.strip() == (f"{tmp_path / 'll.lua'}: note: no global analysis: Lua 5.4 does not "
                           "compile it (line 2: malformed number near '1L')")


def test_files_and_directories_mix_and_each_file_is_checked_once(capsys, tmp_path):
    write(tmp_path, {"a.lua": SCRIPTS["globals.lua"], "notes.txt": "x = 1\n"})
    code, out, err = run(capsys, "--engine", "lua54", "--hooks", HOOKS, str(tmp_path / "a.lua"),
                         str(tmp_path))
    assert code == 1
    assert len(err.splitlines()) == 3  # globals.lua's three, once; notes.txt not taken


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.lua"], "hostscript check: no such file or directory: {tmp}/missing.lua"),
    (["{tmp}/empty"], "hostscript check: no .lua files in directory {tmp}/empty"),
    (["--hooks", "a b", "{tmp}/empty"], "hostscript check: invalid hook name 'a b' (use a-z, 0-9, _)"),
])
def test_usage_errors_exit_2(capsys, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert (code, out, err.strip()) == (2, "", message.format(tmp=tmp_path))


def test_the_listing_sees_env_accesses_only():
    # t.x on an upvalue t is GETTABUP too: only the _ENV upvalue's keys are globals
    lst, err = check_mod.listing(b"local t = {}\nlocal function f() return t.x, y end\n"
                                 b"local C = {}\nC.on_log = f\nreturn C\n")
    assert err is None
    assert lst.accesses == [(2, "read", "y")]
    assert lst.fields == {"on_log": 4}
    assert lst.main_return == 5


def test_the_examples_pass_the_global_analysis(capsys):
    root = pathlib.Path(__file__).resolve().parent.parent / "examples"
    code, out, err = run(capsys, "--engine", "luajit", "--engine", "lua54",
                         "--shared", "meta=redis://127.0.0.1:9/0", str(root))
    assert (code, err) == (0, ""), err


def test_a_chunk_that_loops_is_reported_not_waited_for(tmp_path):
    write(tmp_path, {"loop.lua": "local C = {}\nwhile true do end\nreturn C\n"})
    made = []

    def make_host(engine, sandbox):
        made.append(sandbox)
        return hostscript.Host(HOOKS.split(","), engine=engine, sandbox=sandbox, time_limit=0.2)

    t0 = time.monotonic()
    problems, notes = check_mod.check_file(str(tmp_path / "loop.lua"), HOOKS.split(","), ["lua54"],
                                           make_host)
    assert made == [True]  # run once: not again for the class
    assert time.monotonic() - t0 < 5
    assert len(problems) == 1 and notes == []
    assert re.fullmatch(re.escape(str(tmp_path / "loop.lua")) + r":\d+: time limit exceeded \(0.2 s\)",
                        str(problems[0])), problems


def test_the_cli_runs_scripts_under_its_time_limit(capsys, tmp_path, monkeypatch):
    import hostscript.cli as cli

    assert 0 < cli.CHECK_TIME_LIMIT <= 10 and cli.CHECK_MEMORY_LIMIT > 0
    monkeypatch.setattr(cli, "CHECK_TIME_LIMIT", 0.3)
    write(tmp_path, {"loop.lua": "local C = {}\nwhile true do end\nreturn C\n"})
    code, out, err = run(capsys, "--engine", "luajit", "--hooks", HOOKS, str(tmp_path))
    assert code == 1 and "time limit exceeded (0.3 s)" in err, err


def test_without_luac_the_check_says_so_and_skips_the_global_analysis(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(check_mod, "luac_available", lambda: False)
    write(tmp_path, {"globals.lua": SCRIPTS["globals.lua"], "hooks.lua": SCRIPTS["hooks.lua"]})
    code, out, err = run(capsys, "--engine", "lua54", "--hooks", HOOKS, str(tmp_path))
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "hostscript check: luac5.4 not found (Debian package lua5.4): no global analysis"
    # the class problems are still found; their lines come from the source text then
    assert sorted(lines[1:]) == expected_lines(tmp_path, {"hooks.lua": EXPECTED["hooks.lua"]})
    assert out.splitlines() == [f"{tmp_path / 'globals.lua'}: ok"]
