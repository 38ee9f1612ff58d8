"""hs.key, the Key response header module (draft-ietf-httpbis-key-01), on both engines:
every vector of tests/data/key_vectors.json through the header map and the pairs list,
key.parse, key.join, several Key lines, the readings the module documents, and hostile
input that must give a result or nil, err quickly and never a Lua error."""
from __future__ import annotations

import json
import pathlib
import random

import pytest

from hostscript import Outcome, Transaction

VECTORS = json.loads((pathlib.Path(__file__).parent / "data" / "key_vectors.json").read_text())

# One handler for every test: txn.ctx.op says what to call, txn.ctx.out gets the answer.
# nil results become false (a nil would leave the key out of ctx).
SCRIPT = r"""
local key = require "hs.key"
local C = {}
function C:on_read_request(txn)
  local c = txn.ctx
  local out = {}
  local t = os.clock()
  if c.op == "parse" then
    local items, err = key.parse(c.key)
    out.items, out.err = items or false, err or false
  elseif c.op == "join" then
    out.joined = key.join(c.parts)
  elseif c.op == "bad_args" then
    local ok, err = pcall(key.secondary_key, c.key, c.headers_arg)
    out.ok, out.err = ok, err
  else
    local headers = c.pairs or txn.req.headers
    local parts, err = key.secondary_key(c.key, headers)
    out.parts, out.err = parts or false, err or false
    out.joined = parts and key.join(parts) or false
  end
  out.seconds = os.clock() - t
  c.out = out
end
return C
"""

FAST = 1.0  # seconds of CPU time a hostile call may take (they take milliseconds)


@pytest.fixture
def key_host(make_host):
    host = make_host(hooks=("read_request",), time_limit=20.0)
    host.load(SCRIPT, name="key_test.lua")
    return host


def call(host, headers=(), **ctx):
    """Fire the handler with CTX (op, key, pairs, ...) and request HEADERS; its answer."""
    txn = Transaction("GET", "/", headers=list(headers))
    txn.ctx = ctx
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error
    return txn.ctx["out"]


def as_list(v):
    """An empty Lua table comes back as {}."""
    return [] if v == {} else v


def secondary_key(host, key, headers=(), form="map"):
    """(parts or None, err or None) from key.secondary_key, headers as map or pairs list."""
    if form == "map":
        out = call(host, headers, op="secondary_key", key=key)
    else:
        out = call(host, op="secondary_key", key=key, pairs=[list(p) for p in headers])
    if out["parts"] is False:
        assert out["joined"] is False
        assert isinstance(out["err"], str) and out["err"]
        return None, out["err"]
    assert out["err"] is False
    parts = as_list(out["parts"])
    assert out["joined"] == "".join(p + "\0" for p in parts)  # no "\\" or NUL in these parts
    return parts, None


def parse(host, key):
    out = call(host, op="parse", key=key)
    if out["items"] is False:
        assert isinstance(out["err"], str) and out["err"]
        return None, out["err"]
    assert out["err"] is False
    items = as_list(out["items"])
    return [{"field": i["field"], "params": as_list(i["params"])} for i in items], None


FORMS = ["map", "pairs"]


# =====================================================================================
# The vectors
# =====================================================================================

def test_vectors_file_is_the_shared_material():
    assert len(VECTORS) == 86
    assert len({v["id"] for v in VECTORS}) == 86
    assert sum(v["expect"] == "FAIL" for v in VECTORS) == 12


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector(key_host, vector, form):
    parts, err = secondary_key(key_host, vector["key"], vector["request_headers"], form)
    if vector["expect"] == "FAIL":
        assert parts is None
        assert err.startswith("item "), err  # names the failing item
    else:
        assert err is None
        assert parts == vector["expect"]


# =====================================================================================
# key.parse
# =====================================================================================

def test_parse_lowercases_names_and_unquotes_values(key_host):
    items, err = parse(key_host, 'user-agent;substr=MSIE;Substr="mobile", Cookie;param="ID"')
    assert err is None
    assert items == [
        {"field": "user-agent", "params": [["substr", "MSIE"], ["substr", "mobile"]]},
        {"field": "Cookie", "params": [["param", "ID"]]},
    ]


def test_parse_trims_only_around_items_and_semicolons(key_host):
    items, _ = parse(key_host, " \tBar \t;\t div=5 ; DIV = 6 \t, Baz;match=x")
    assert items == [
        {"field": "Bar", "params": [["div", "5"], ["div ", " 6"]]},
        {"field": "Baz", "params": [["match", "x"]]},
    ]


def test_parse_splits_outside_quoted_strings_only(key_host):
    items, _ = parse(key_host, r'A;match="x,y;z";substr=q, B;param="a\"b\\c, d;e", C;div=1')
    assert items == [
        {"field": "A", "params": [["match", "x,y;z"], ["substr", "q"]]},
        {"field": "B", "params": [["param", 'a"b\\c, d;e']]},
        {"field": "C", "params": [["div", "1"]]},
    ]


@pytest.mark.parametrize("raw", ['"abc', 'abc"', '"', 'a\\"b'])
def test_parse_unquotes_only_values_quoted_at_both_ends(key_host, raw):
    items, _ = parse(key_host, "A;match=" + raw)
    assert items == [{"field": "A", "params": [["match", raw]]}]


def test_parse_keeps_bare_field_names_without_params(key_host):
    items, _ = parse(key_host, "Accept-Encoding, Cookie;param=foo")
    assert items == [{"field": "Accept-Encoding", "params": []},
                     {"field": "Cookie", "params": [["param", "foo"]]}]


def test_parse_keeps_unknown_parameters(key_host):
    items, _ = parse(key_host, "Bar;Frob=1;div=2")
    assert items == [{"field": "Bar", "params": [["frob", "1"], ["div", "2"]]}]


@pytest.mark.parametrize("key, where", [
    ("Bar;div", 'item 1 ("Bar"): parameter 1 "div" has no "="'),
    ("Bar;div=5;", 'item 1 ("Bar"): parameter 2 "" has no "="'),
    ("Bar;div=5, Baz;div=1;match", 'item 2 ("Baz"): parameter 2 "match" has no "="'),
    ("Bar;div=5, , Baz;div=1", "item 2 is empty"),
    ("Bar;div=5,", "item 2 is empty"),
    ("", "item 1 is empty"),
])
def test_parse_errors_say_what_and_where(key_host, key, where):
    items, err = parse(key_host, key)
    assert items is None
    assert err == where


def test_parse_of_an_absent_value(key_host):
    assert parse(key_host, None) == (None, "no Key value")
    assert parse(key_host, []) == (None, "no Key value")


def test_parse_combines_several_key_lines(key_host):
    lines, _ = parse(key_host, [" Bar;div=5\t", "Baz;match=x ", "Cookie;param=id"])
    one, _ = parse(key_host, "Bar;div=5,Baz;match=x,Cookie;param=id")
    assert lines == one
    assert [i["field"] for i in lines] == ["Bar", "Baz", "Cookie"]


# =====================================================================================
# key.secondary_key: header forms, several Key lines, errors
# =====================================================================================

@pytest.mark.parametrize("form", FORMS)
def test_field_names_are_case_insensitive_and_lines_combine(key_host, form):
    headers = [("COOKIE", "a=1"), ("X", "y"), ("cookie", " b=2 "), ("Bar", "1"), ("bar", "2")]
    parts, _ = secondary_key(key_host, "Cookie;param=B;param=A, BAR;match=2", headers, form)
    assert parts == ["2", "1", "1"]


def test_header_map_and_pairs_list_agree(key_host):
    headers = [("Accept", "text/html, application/json;q=0.9"), ("X-Num", " 0041 , 7"),
               ("Cookie", "sid=xyz; Theme=dark"), ("accept", "*/*")]
    key = ("Accept;match=text;substr=json, X-Num;div=10;partition=10:40.5:41, "
           "Cookie;param=theme, X-Absent;div=3")
    want = ["0", "1", "4", "3", "dark", "none"]
    assert secondary_key(key_host, key, headers, "map") == (want, None)
    assert secondary_key(key_host, key, headers, "pairs") == (want, None)


@pytest.mark.parametrize("form", FORMS)
def test_several_key_lines(key_host, form):
    headers = [("Bar", "12"), ("Foo", "35")]
    parts, _ = secondary_key(key_host, ["Bar;div=5 ", " Foo;partition=20:30:40"], headers, form)
    assert parts == ["2", "2"]
    parts, _ = secondary_key(key_host, ["Bar;div=5", "Foo;partition=20:30:40, Bar;div=2"],
                             headers, form)
    assert parts == ["2", "2", "6"]


def test_an_absent_key_is_an_error(key_host):
    assert secondary_key(key_host, None) == (None, "no Key value")
    assert secondary_key(key_host, []) == (None, "no Key value")


@pytest.mark.parametrize("key, err", [
    ("Bar;div=5, Baz;frob=1", 'item 2 ("Baz"): unknown parameter "frob"'),
    ("Bar;div=5, Accept", 'item 2 ("Accept"): a field name without parameters fails'
                          " (treat it as Vary does)"),
    ("Bar;div=00", 'item 1 ("Bar"): div: division by zero'),
    ("Bar;div=0", 'item 1 ("Bar"): div: a divisor of 0 divides by zero'),
    ("Bar;div=-5", 'item 1 ("Bar"): div value "-5" is not 1*DIGIT'),
    ("Bar;partition=1:x", 'item 1 ("Bar"): partition value "1:x" is not'
                          ' a list of numbers split by ":"'),
    ("Bar;match=a b", 'item 1 ("Bar"): match value "a b" is not a token or quoted-string'),
    ("Baz;div=5", 'item 1 ("Baz"): div: field value "1.5" is not 1*DIGIT'),
    ("Baz;partition=5", 'item 1 ("Baz"): partition: field value "1.5x" is not a number'),
])
def test_errors_name_the_failing_item(key_host, key, err):
    headers = [("Bar", "12"), ("Baz", "1.5" if "div" in key else "1.5x")]
    for form in FORMS:
        assert secondary_key(key_host, key, headers, form) == (None, err)


def test_error_messages_are_short_and_printable(key_host):
    long_name = "X" * 5000 + "\x01\xff"
    _, err = secondary_key(key_host, long_name + ";frob=1")
    assert err == 'item 1 ("' + "X" * 40 + '..."): unknown parameter "frob"'
    _, err = secondary_key(key_host, "A;frob\x00\t=1")
    assert err == 'item 1 ("A"): unknown parameter "frob??"'


def test_bad_argument_types_raise(key_host):
    out = call(key_host, op="bad_args", key=42, headers_arg=[])
    assert out["ok"] is False and "Key value must be a string" in out["err"]
    out = call(key_host, op="bad_args", key="Bar;div=5", headers_arg="Bar: 1")
    assert out["ok"] is False and "headers must be" in out["err"]


# =====================================================================================
# The parameters, beyond the vectors
# =====================================================================================

def one(host, key, value, form="pairs"):
    """The parts of KEY for a request whose field of KEY's name has VALUE (None: absent)."""
    field = key.split(";", 1)[0]
    headers = [] if value is None else [(field, value)]
    return secondary_key(host, key, headers, form)


@pytest.mark.parametrize("header, divisor", [
    ("123456789012345678901234567890", "7"),
    ("98765432109876543210", "99999999999999"),          # the largest divisor done in doubles
    ("98765432109876543210", "100000000000000"),         # the smallest done on digit strings
    ("123456789" * 10, "99999999999999999999999999"),
    ("9" * 1000, "1" + "0" * 499),
    ("9" * 1000, "3" * 500),
    ("4" * 600, "7" * 601),
    ("0000012", "0005"),
    ("0", "3"),
    ("12 3 4\t5, 9", "11"),
])
def test_div_is_exact_integer_division(key_host, header, divisor):
    a = int(header.split(",")[0].replace(" ", "").replace("\t", ""))
    assert one(key_host, f"Bar;div={divisor}", header) == ([str(a // int(divisor))], None)


def test_div_random_against_python(key_host):
    rng = random.Random(7)
    key_parts, headers, want = [], [], []
    for i in range(200):
        a = rng.randrange(10 ** rng.randrange(1, 60))
        d = rng.randrange(1, 10 ** rng.randrange(1, 30))
        key_parts.append(f"N{i};div={d}")
        headers.append((f"N{i}", str(a)))
        want.append(str(a // d))
    assert secondary_key(key_host, ", ".join(key_parts), headers, "pairs") == (want, None)


def test_div_quoted_value_passes_after_unquoting(key_host):
    assert one(key_host, 'Bar;div="5"', "12") == (["2"], None)


@pytest.mark.parametrize("header, bounds, want", [
    ("1.4999999999999999999999", "1.5:1.50:2", "0"),  # 1.5 as a double
    ("1.5", "1.5:1.50:2", "2"),
    ("1.5000000000000000000001", "1.5:1.50:1.5000000000000000000002", "2"),
    ("000020.000", "20", "1"),
    (".5", "0.5:00.50", "2"),
    ("0.05", "0.5", "0"),
    ("9", "10", "0"),
    ("10", "9", "1"),
    ("30", "40:20", "0"),  # unsorted: counting stops at the first boundary above
    ("100000000000000000001", "100000000000000000000:100000000000000000002", "1"),
])
def test_partition_compares_exact_decimals(key_host, header, bounds, want):
    assert one(key_host, f"Foo;partition={bounds}", header) == ([want], None)


def test_partition_empty_boundary_fails_unless_the_field_is_absent(key_host):
    assert one(key_host, "Foo;partition=20::40", None) == (["none"], None)
    _, err = one(key_host, "Foo;partition=20::40", "10")
    assert err == 'item 1 ("Foo"): partition: boundary 2 is empty'
    _, err = one(key_host, "Foo;partition=", "10")
    assert err == 'item 1 ("Foo"): partition: boundary 1 is empty'


def test_match_splits_the_field_on_every_comma_even_inside_quotes(key_host):
    assert one(key_host, "Baz;match=charlie", '"foo, charlie, bar"') == (["1"], None)
    assert one(key_host, "Baz;match=charlie", '"foo,charlie"') == (["0"], None)
    assert one(key_host, 'Baz;match="\\"x\\""', 'a, "x" ') == (["1"], None)


def test_param_splits_on_every_comma_and_semicolon_and_keeps_name_spaces(key_host):
    assert one(key_host, "Cookie;param=id", 'a="x;id=5"') == (['5"'], None)
    assert one(key_host, "Cookie;param=id", "a=1, ID=2;id=3") == (["2"], None)
    assert one(key_host, "Cookie;param=id", "id =1; id") == ([""], None)


def test_substr_long_values_against_python(key_host):
    rng = random.Random(11)
    key_parts, headers, want = [], [], []
    for i in range(60):
        unit = rng.choice(["ab", "aab", "abaab"])
        text = "".join(rng.choice([unit, "a", "b"]) for _ in range(rng.randrange(40, 200)))
        if i % 2:
            start = rng.randrange(len(text) // 2)
            word = text[start:start + rng.randrange(65, 150)]
        else:
            word = unit * rng.randrange(30, 60) + rng.choice(["a", "b", "ba"])
        key_parts.append(f"T{i};substr={word}")
        headers.append((f"T{i}", text))
        want.append("1" if word in text else "0")
    assert "0" in want and "1" in want
    assert secondary_key(key_host, ", ".join(key_parts), headers, "pairs") == (want, None)


# =====================================================================================
# key.join
# =====================================================================================

@pytest.mark.parametrize("parts, joined", [
    ([], ""),
    (["2", "none", ""], "2\0none\0\0"),
    (["a\0b"], "a\\0b\0"),
    (["a", "b"], "a\0b\0"),
    (["x\\"], "x\\\\\0"),
    (["x\\0"], "x\\\\0\0"),
    (["\t\x01"], "\t\x01\0"),
])
def test_join(key_host, parts, joined):
    assert call(key_host, op="join", parts=parts)["joined"] == joined


def test_join_keeps_results_with_nul_apart(key_host):
    pairs = [["Cookie", "a=x\x00y"], ["Cookie", "b=y"]]
    out = call(key_host, op="secondary_key", key="Cookie;param=a;param=b", pairs=pairs)
    assert out["parts"] == ["x\x00y", "y"]
    assert out["joined"] == "x\\0y\0y\0"
    out2 = call(key_host, op="secondary_key", key="Cookie;param=a;param=b",
                pairs=[["Cookie", "a=x; b=y\x00y"]])
    assert out2["parts"] == ["x", "y\x00y"]
    assert out2["joined"] != out["joined"]


# =====================================================================================
# Hostile input: a result or nil, err, quickly, never a Lua error
# =====================================================================================

def hostile(host, key, headers=(), form="map"):
    if form == "map":
        out = call(host, headers, op="secondary_key", key=key)
    else:
        out = call(host, op="secondary_key", key=key, pairs=[list(p) for p in headers])
    assert out["seconds"] < FAST, out["seconds"]
    return as_list(out["parts"]), out["err"]


def test_hostile_100kb_key_of_items(key_host):
    key = ", ".join(["Bar;div=5"] * 9100)
    assert len(key) > 100_000
    parts, err = hostile(key_host, key, [("Bar", "12")])
    assert err is False and parts == ["2"] * 9100


def test_hostile_10k_items_of_different_fields(key_host):
    key = ",".join(f"H{i};param=k{i}" for i in range(10_000))
    headers = [(f"h{i}", f"k{i}=v{i}") for i in range(0, 10_000, 1000)]
    for form in FORMS:
        parts, err = hostile(key_host, key, headers, form)
        assert err is False
        assert parts == [f"v{i}" if i % 1000 == 0 else "" for i in range(10_000)]


def test_hostile_100kb_values(key_host):
    big = "x" * 100_000
    parts, err = hostile(key_host, f'Bar;match="{big}";substr={big}', [("Bar", big + "," + big)])
    assert err is False and parts == ["1", "1"]
    parts, err = hostile(key_host, "Bar;substr=" + "a" * 50_000 + "b", [("Bar", "a" * 100_000)])
    assert err is False and parts == ["0"]
    parts, err = hostile(key_host, "Bar;param=" + big, [("Bar", "; ;=, " * 15_000 + big + "=1")])
    assert err is False and parts == ["1"]


@pytest.mark.parametrize("key", [
    'Bar;match="abc, Baz;div=5',
    '"' * 100_001,
    'Bar;match="' + '\\"' * 50_000,
    'Bar;match="' + "\\" * 100_001,
    "Bar;div=5" + ';"' * 50_000,
    ";" * 100_000,
    "," * 100_000,
    "=" * 100_000,
])
def test_hostile_unbalanced_quotes_and_separators(key_host, key):
    parts, err = hostile(key_host, key, [("Bar", "12")])
    assert parts is False and err.startswith("item ")


@pytest.mark.parametrize("form", FORMS)
def test_hostile_huge_divisor(key_host, form):
    key = "Bar;div=99999999999999999999999999"
    assert hostile(key_host, key, [("Bar", "12")], form) == (["0"], False)
    n = "31415926535897932384626433832795028841971693993751" * 10
    assert hostile(key_host, key, [("Bar", n)], form) == (
        [str(int(n) // 99999999999999999999999999)], False)


def test_hostile_huge_numbers_for_div(key_host):
    assert hostile(key_host, "Bar;div=7", [("Bar", "7" * 100_000)]) == (["1" * 100_000], False)
    assert hostile(key_host, "Bar;div=" + "9" * 50_000, [("Bar", "9" * 50_000)]) == (["1"], False)
    assert hostile(key_host, "Bar;div=" + "9" * 60_000, [("Bar", "9" * 50_000)]) == (["0"], False)
    assert hostile(key_host, "Bar;div=" + "0" * 100_000, [("Bar", "1")])[1] == \
        'item 1 ("Bar"): div: division by zero'
    # a divisor over 14 digits: at most half a million digit steps, (n - d + 10) * d
    parts, err = hostile(key_host, "Bar;div=" + "3" * 500, [("Bar", "9" * 1000)])
    assert parts == [str(int("9" * 1000) // int("3" * 500))]
    parts, err = hostile(key_host, "Bar;div=" + "3" * 1000, [("Bar", "9" * 2000)])
    assert parts is False
    assert err == ('item 1 ("Bar"): div: dividing a 2000-digit number by a 1000-digit one'
                   ' is beyond the bound of 500000 steps')
    parts, err = hostile(key_host, "Bar;div=" + "3" * 15, [("Bar", "9" * 100_000)])
    assert parts is False and "beyond the bound" in err


def test_hostile_1000_digit_partition(key_host):
    n = "".join(random.Random(3).choice("0123456789") for _ in range(1000))
    lo, hi = int(n) - 1, int(n) + 1
    frac = "0." + n
    bounds = ":".join([str(lo), n, "0" * 500 + n + ".000", str(hi), frac])
    parts, err = hostile(key_host, f"Foo;partition={bounds}", [("Foo", "0" * 300 + n)])
    assert err is False and parts == ["3"]
    parts, err = hostile(key_host, f"Foo;partition={frac}:{frac}1", [("Foo", frac + "0" * 1000)])
    assert err is False and parts == ["1"]
    long_zeros = "1" + "0" * 100_000 + "1"
    parts, err = hostile(key_host, "Foo;partition=" + "0." + long_zeros,
                         [("Foo", "0." + long_zeros[:-1] + "2")])
    assert err is False and parts == ["1"]


def test_hostile_nul_bytes(key_host):
    pairs = [("Bar\x00", "12"), ("Bar", "1\x002"), ("Baz", "a\x00b")]
    assert hostile(key_host, "Bar\x00;div=5", pairs, "pairs") == (["2"], False)
    assert hostile(key_host, "Bar\x00;div=5", [("Bar", "12")], "map") == (["none"], False)
    parts, err = hostile(key_host, "Bar;div=5", pairs, "pairs")
    assert parts is False and err == 'item 1 ("Bar"): div: field value "1?2" is not 1*DIGIT'
    parts, err = hostile(key_host, "Baz;match=a\x00b", pairs, "pairs")
    assert parts is False and "is not a token or quoted-string" in err
    assert hostile(key_host, 'Baz;substr="a\\\x00b"', pairs, "pairs")[0] is False
    assert hostile(key_host, "Baz;param=a", [("Baz", "A=\x00")], "pairs") == (["\x00"], False)


def test_hostile_whitespace_runs(key_host):
    ws = " \t" * 50_000
    parts, err = hostile(key_host, ws + "Bar" + ws + ";" + ws + "div=5" + ws,
                         [("Bar", ws + "1" + ws + "2" + ws)])
    assert err is False and parts == ["2"]
    parts, err = hostile(key_host, "Bar;match=x", [("Bar", ws + "y" + ws + "," + ws + "x" + ws)])
    assert err is False and parts == ["1"]


def test_remembered_parses_stay_right_past_the_bound_and_after_errors(key_host):
    # secondary_key keeps the parse of the Key values it saw (256 per state): results
    # must not depend on what it remembers, nor on what a caller did to parse()'s items
    hdrs = [("Abc", "bennet"), ("N", "35")]
    assert secondary_key(key_host, "abc;match=bennet", hdrs) == (["1"], None)
    out = call(key_host, op="parse", key="abc;match=bennet")
    assert out["items"][0]["params"][0] == ["match", "bennet"]
    for i in range(300):  # more distinct values than it keeps
        assert secondary_key(key_host, f"n;partition={i}", hdrs) == (["1" if i <= 35 else "0"], None)
    assert secondary_key(key_host, "abc;match=bennet", hdrs) == (["1"], None)
    assert secondary_key(key_host, "abc;frob=1", hdrs)[1] is not None
    assert secondary_key(key_host, "abc;frob=1", hdrs)[1] is not None  # a remembered error
    assert secondary_key(key_host, "abc;match=bennet", [("Abc", "theodore")]) == (["0"], None)
