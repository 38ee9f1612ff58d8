#!/bin/sh
# Build position-independent static Lua 5.4 and LuaJIT archives for the engine modules.
#
# Debian ships liblua5.4.a and libluajit-5.1.a compiled without -fPIC, which cannot be
# linked into a Python extension. We rebuild the very same Debian source packages that
# pkg-config found (liblua5.4-dev, libluajit2-5.1-dev), with -fPIC, into build/lua/:
#   build/lua/lua54/{include,liblua.a}   build/lua/luajit/{include,libluajit.a}
# The engine modules link these with --exclude-libs=ALL, so no lua_* symbol is exported.
#
# Each engine gets one small patch from tools/patches/ before it is compiled: its long
# C loops (pattern matching, string.rep; on Lua 5.4 table.move/concat too) check in with hostscript's
# time limit, and C code calling back into Lua checks the thread's C stack
# (native/limits.c has the other half). An archive built from other patches — or
# none — is rebuilt.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/lua"
src="$out/src"
jobs=$(nproc 2>/dev/null || echo 2)

need() {
    echo "hostscript: $1" >&2
    echo "hostscript: on Debian/Ubuntu run 'make deps' as root (installs liblua5.4-dev libluajit2-5.1-dev pkg-config dpkg-dev)" >&2
    exit 1
}

command -v pkg-config >/dev/null || need "pkg-config is missing"
pkg-config --exists lua5.4 || need "Lua 5.4 development files are missing (Debian: liblua5.4-dev)"
pkg-config --exists luajit || need "LuaJIT development files are missing (Debian: libluajit2-5.1-dev)"

fetch() { # fetch <binary package> -> prints the unpacked source directory
    pkg=$1
    ver=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || need "$pkg is not installed"
    srcpkg=$(dpkg-query -W -f='${source:Package}' "$pkg")
    stamp="$src/$srcpkg-$ver.dir"
    if [ -f "$stamp" ] && [ -d "$(cat "$stamp")" ]; then cat "$stamp"; return; fi
    mkdir -p "$src"
    (cd "$src" && apt-get source -qq --only-source "$srcpkg=$ver" >/dev/null 2>&1) ||
        need "could not fetch the source of $srcpkg $ver (needs deb-src in apt sources: 'make deps' adds it)"
    dir=$(find "$src" -maxdepth 1 -type d -name "$srcpkg-*" | sort | tail -1)
    echo "$dir" > "$stamp"
    echo "$dir"
}

# patched <engine> <unpacked source dir> -> prints a patched copy under build/lua/
patched() {
    copy="$out/$1-src"
    rm -rf "$copy" && cp -r "$2" "$copy"
    patch -s -p1 -d "$copy" < "$root/tools/patches/$1-limits.patch" || need "tools/patches/$1-limits.patch does not apply to $(basename "$2")"
    echo "$copy"
}

stamp_of() { cat "$root/tools/patches/$1-limits.patch" "$0" | cksum | cut -d' ' -f1; }

if [ ! -f "$out/lua54/liblua.a" ] || [ "$(cat "$out/lua54/patch.stamp" 2>/dev/null)" != "$(stamp_of lua54)" ]; then
    d=$(patched lua54 "$(fetch liblua5.4-dev)")
    rm -rf "$out/lua54" && mkdir -p "$out/lua54/include" "$out/lua54/obj"
    for f in "$d"/src/*.c; do
        case $(basename "$f") in lua.c|luac.c) continue ;; esac
        echo "$f"
    done | xargs -P "$jobs" -I{} sh -c 'gcc -O2 -fPIC -DLUA_COMPAT_5_3 -DLUA_USE_POSIX -c "$1" -o "$2/obj/$(basename "$1" .c).o"' _ {} "$out/lua54"
    ar rcs "$out/lua54/liblua.a" "$out"/lua54/obj/*.o
    cp "$d"/src/lua.h "$d"/src/luaconf.h "$d"/src/lualib.h "$d"/src/lauxlib.h "$out/lua54/include/"
    stamp_of lua54 > "$out/lua54/patch.stamp"
    echo "hostscript: built $out/lua54/liblua.a from $(basename "$d") (patched)"
fi

if [ ! -f "$out/luajit/libluajit.a" ] || [ "$(cat "$out/luajit/patch.stamp" 2>/dev/null)" != "$(stamp_of luajit)" ]; then
    d=$(patched luajit "$(fetch libluajit2-5.1-dev)")
    make -s -C "$d/src" -j"$jobs" clean >/dev/null 2>&1 || true
    make -s -C "$d/src" -j"$jobs" libluajit.a BUILDMODE=static CFLAGS="-fPIC" >/dev/null
    rm -rf "$out/luajit" && mkdir -p "$out/luajit/include"
    cp "$d/src/libluajit.a" "$out/luajit/"
    cp "$d"/src/lua.h "$d"/src/luaconf.h "$d"/src/lualib.h "$d"/src/lauxlib.h "$d"/src/luajit.h "$out/luajit/include/"
    [ -f "$d/src/lua.hpp" ] && cp "$d/src/lua.hpp" "$out/luajit/include/" || true
    stamp_of luajit > "$out/luajit/patch.stamp"
    echo "hostscript: built $out/luajit/libluajit.a from $(basename "$d") (patched)"
fi
