#!/bin/sh
# Install what building hostscript needs on Debian/Ubuntu, when it is missing:
# the Lua dev packages pkg-config finds, hiredis (the Redis client of the C core),
# luac5.4 (`hostscript check`'s global analysis), a compiler, redis-server (the tests start their own on loopback),
# trafficserver and trafficserver-dev (the Traffic Server plugin, hosts/ats; the tests run a private instance), and deb-src
# entries so that tools/build-lua.sh can fetch the matching Lua sources. Runs apt
# only as root. Installing redis-server or trafficserver never starts its system service here.
#   sh tools/install-deps.sh          the build's packages
#   sh tools/install-deps.sh bench    those and wrk, the HTTP load generator of the
#                                     proxy rows of `hostscript bench` (`make bench`), and
#                                     nginx-light, the origin of `hostscript bench --ats`
#   sh tools/install-deps.sh test     the bench's and valgrind (`make test`: the smoke
#                                     runs of the benchmarks, the C core under valgrind)
set -eu
pkgs="liblua5.4-dev lua5.4 libluajit2-5.1-dev libhiredis-dev redis-server trafficserver trafficserver-dev pkg-config dpkg-dev gcc make patch python3-venv"
case "${1:-}" in
    "") ;;
    bench) pkgs="$pkgs wrk nginx-light" ;;
    test) pkgs="$pkgs wrk nginx-light valgrind" ;;
    *) echo "usage: sh tools/install-deps.sh [bench|test]" >&2; exit 2 ;;
esac
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# python3-venv is only needed when the interpreter lacks venv/ensurepip
if python3 -c 'import venv, ensurepip' 2>/dev/null; then missing=$(echo "$missing" | sed 's/python3-venv//'); fi
missing=$(echo "$missing" | xargs)

need_src=0
if [ ! -f build/lua/lua54/liblua.a ] || [ ! -f build/lua/luajit/libluajit.a ]; then
    apt-cache showsrc lua5.4 2>/dev/null | grep -q '^Package:' || need_src=1
fi

[ -z "$missing" ] && [ "$need_src" = 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "hostscript: missing system packages: ${missing:-none}; deb-src entries: $([ $need_src = 1 ] && echo missing || echo ok)" >&2
    if [ -n "${1:-}" ]; then
        echo "hostscript: run 'sudo sh tools/install-deps.sh $1' (or install them yourself) and retry" >&2
    else
        echo "hostscript: run 'sudo make deps' (or install them yourself) and retry" >&2
    fi
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ "$need_src" = 1 ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            > /etc/apt/sources.list.d/hostscript-src.sources
    else
        . /etc/os-release
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$VERSION_CODENAME" > /etc/apt/sources.list.d/hostscript-src.sources
    fi
fi
apt-get update -qq
if [ -n "$missing" ]; then
    # a package's postinst must not start a system service (redis-server's would
    # listen on 6379, trafficserver's on 8080, nginx's on 80): policy-rc.d says no for the length of the install
    policy=/usr/sbin/policy-rc.d
    ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && ours=1
    fi
    apt-get install -y -qq $missing || { [ $ours = 1 ] && rm -f "$policy"; exit 1; }
    [ $ours = 1 ] && rm -f "$policy"
fi
exit 0
