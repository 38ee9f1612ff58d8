"""Decoder for txn.ctx as the core serializes it (native/ctx.c documents the format):
sequences (keys 1..n) become lists, other tables dicts. A boolean key that equals a
number key in Python (true/1, false/0) is shown as the string "true"/"false"."""
from __future__ import annotations

import struct
from typing import Any, Tuple

_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")


def decode(data: bytes) -> dict:
    if not data:
        return {}
    value, _ = _value(memoryview(data), 0)
    return value if isinstance(value, dict) else {i + 1: v for i, v in enumerate(value)}


def _value(buf: memoryview, pos: int) -> Tuple[Any, int]:
    tag = buf[pos]
    pos += 1
    if tag == 0x74:  # t
        return True, pos
    if tag == 0x66:  # f
        return False, pos
    if tag == 0x69:  # i
        return _I64.unpack_from(buf, pos)[0], pos + 8
    if tag == 0x64:  # d
        return _F64.unpack_from(buf, pos)[0], pos + 8
    if tag == 0x73:  # s
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        raw = bytes(buf[pos:pos + n])
        try:
            return raw.decode("utf-8"), pos + n
        except UnicodeDecodeError:
            return raw, pos + n
    if tag == 0x54:  # T
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        table: dict = {}
        for _ in range(n):
            k, pos = _value(buf, pos)
            v, pos = _value(buf, pos)
            if k in table:
                # Lua keeps t[1] and t[true] apart, a dict cannot: the boolean key
                # is shown as the string "true"/"false" rather than lose a value.
                if isinstance(k, bool):
                    bkey, bval = k, v
                else:
                    bkey = next(x for x in table if x == k)
                    bval = table.pop(bkey)
                    table[k] = v
                name = "true" if bkey else "false"
                if name in table:
                    raise ValueError("txn.ctx has keys 1, true and \"true\" (or 0, false and "
                                     "\"false\") in one table; Python cannot show them apart")
                table[name] = bval
                continue
            table[k] = v
        if table and all(isinstance(k, int) and not isinstance(k, bool) for k in table) \
                and sorted(table) == list(range(1, len(table) + 1)):
            return [table[i] for i in range(1, len(table) + 1)], pos
        return table, pos
    raise ValueError(f"corrupt ctx data (tag {tag!r} at {pos - 1})")
