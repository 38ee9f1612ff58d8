"""The proxy's response cache (hostscript/proxy/cache.py): what it stores, for how
long, which variant it answers with, and how it stays within its bytes."""
from __future__ import annotations

import email.utils
import threading
import time

import pytest

from hostscript.proxy.cache import ResponseCache, cache_control

URL = "http://origin/a"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(clock):
    return ResponseCache(max_bytes=1 << 20, clock=clock)


def put(cache, headers, body=b"body", req=(), status=200, url=URL, secondary=b"", method="GET"):
    return cache.store(method, url, secondary, list(req), status, list(headers), body)


def get(cache, req=(), url=URL, secondary=b"", method="GET"):
    return cache.lookup(method, url, secondary, list(req))


def test_max_age_hit_then_stale(cache, clock):
    assert put(cache, [("Cache-Control", "max-age=10"), ("Content-Type", "text/plain")])
    hit = get(cache)
    assert hit.status == 200 and hit.body == b"body" and hit.age == 0
    assert ("Content-Type", "text/plain") in hit.headers
    clock.t += 4.5
    assert get(cache).age == 4
    clock.t += 6
    assert get(cache) is None  # 10.5 s old: stale, dropped
    assert cache.stats()["entries"] == 0


def test_s_maxage_wins_over_max_age(cache, clock):
    put(cache, [("Cache-Control", "max-age=1, s-maxage=100")])
    clock.t += 50
    assert get(cache) is not None


def test_upstream_age_counts(cache, clock):
    put(cache, [("Cache-Control", "max-age=10"), ("Age", "7")])
    assert get(cache).age == 7
    clock.t += 3
    assert get(cache) is None
    assert not put(cache, [("Cache-Control", "max-age=10"), ("Age", "10")])  # already stale


def test_expires_minus_date():
    cache = ResponseCache()
    now = time.time()
    ok = [("Date", email.utils.formatdate(now, usegmt=True)),
          ("Expires", email.utils.formatdate(now + 60, usegmt=True))]
    assert put(cache, ok) and get(cache) is not None
    past = [("Expires", email.utils.formatdate(now - 60, usegmt=True))]
    assert not put(cache, past, url="http://origin/past")
    assert not put(cache, [("Expires", "not a date")], url="http://origin/bad")


@pytest.mark.parametrize("headers", [
    [("Cache-Control", "no-store, max-age=60")],
    [("Cache-Control", "private, max-age=60")],
    [("Cache-Control", 'no-cache="set-cookie", max-age=60')],
    [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1")],
    [("Cache-Control", "max-age=60"), ("Vary", "*")],
    [("Cache-Control", "max-age=0")],
    [],  # no explicit freshness
    [("Cache-Control", "max-age=abc")],
])
def test_not_stored(cache, headers):
    assert not cache.storable("GET", [], 200, headers)
    assert not put(cache, headers)
    assert get(cache) is None


def test_only_get_and_cacheable_statuses(cache):
    cc = [("Cache-Control", "max-age=60")]
    assert not put(cache, cc, method="POST")
    assert not put(cache, cc, status=500)
    assert not put(cache, cc, status=302)
    assert put(cache, cc, status=404, body=b"gone")
    assert get(cache).status == 404
    assert get(cache, method="HEAD").body == b"gone"  # the proxy drops it for HEAD
    assert get(cache, method="POST") is None


def test_request_directives(cache):
    cc = [("Cache-Control", "max-age=60")]
    assert not put(cache, cc, req=[("Cache-Control", "no-store")])
    assert put(cache, cc)
    assert get(cache, req=[("Cache-Control", "no-cache")]) is None
    assert get(cache, req=[("Cache-Control", "max-age=0")]) is None
    assert get(cache, req=[("Pragma", "no-cache")]) is None
    assert get(cache, req=[("Pragma", "no-cache"), ("Cache-Control", "max-age=5")]) is not None
    assert get(cache, req=[("Cache-Control", "max-stale")]) is not None


def test_authorization_needs_public_or_s_maxage(cache):
    auth = [("Authorization", "Bearer x")]
    assert not put(cache, [("Cache-Control", "max-age=60")], req=auth)
    assert put(cache, [("Cache-Control", "public, max-age=60")], req=auth)
    assert put(cache, [("Cache-Control", "s-maxage=60")], req=auth, url="http://origin/b")


def test_vary_selects_the_variant(cache):
    vary = [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language, abc")]
    put(cache, vary, b"en", req=[("Accept-Language", "en"), ("abc", "x")])
    put(cache, vary, b"fr", req=[("accept-language", "fr"), ("abc", "x")])
    assert get(cache, req=[("Accept-Language", "en"), ("ABC", "x")]).body == b"en"
    assert get(cache, req=[("Accept-Language", "fr"), ("abc", "x")]).body == b"fr"
    assert get(cache, req=[("Accept-Language", "de"), ("abc", "x")]) is None
    assert get(cache, req=[("Accept-Language", "en")]) is None  # abc absent differs from "x"
    # whitespace is normalized and lines are combined before comparing
    assert get(cache, req=[("Accept-Language", "en"), ("abc", "  x ")]).body == b"en"
    put(cache, vary, b"two", req=[("abc", "1"), ("abc", "2")])
    assert get(cache, req=[("abc", "1,2")]).body == b"two"
    assert cache.stats()["entries"] == 3


def test_storing_a_variant_again_replaces_it(cache):
    vary = [("Cache-Control", "max-age=60"), ("Vary", "abc")]
    put(cache, vary, b"old", req=[("abc", "x")])
    put(cache, vary, b"new", req=[("abc", "x")])
    assert get(cache, req=[("abc", "x")]).body == b"new"
    assert cache.stats()["entries"] == 1


def test_secondary_key_splits_the_cache(cache):
    cc = [("Cache-Control", "max-age=60")]
    put(cache, cc, b"gen1", secondary=b"1")
    put(cache, cc, b"gen2", secondary=b"2")
    assert get(cache, secondary=b"1").body == b"gen1"
    assert get(cache, secondary=b"2").body == b"gen2"
    assert get(cache) is None


def test_hop_by_hop_and_age_not_replayed(cache):
    put(cache, [("Cache-Control", "max-age=60"), ("Connection", "close"), ("Age", "1"),
                ("Transfer-Encoding", "chunked"), ("X-Cache", "MISS"), ("ETag", '"e"')])
    names = {k.lower() for k, _ in get(cache).headers}
    assert names == {"cache-control", "etag"}


def test_lru_eviction_within_bytes(clock):
    cache = ResponseCache(max_bytes=10_000, max_object=5_000, clock=clock)
    cc = [("Cache-Control", "max-age=60")]
    for i in range(3):
        assert put(cache, cc, bytes(3000), url=f"http://o/{i}")
    assert get(cache, url="http://o/0") is not None  # 0 is now the most recently used
    assert put(cache, cc, bytes(3000), url="http://o/3")
    assert get(cache, url="http://o/1") is None  # the least recently used went
    assert all(get(cache, url=f"http://o/{i}") for i in (0, 2, 3))
    st = cache.stats()
    assert st["evictions"] == 1 and st["entries"] == 3 and st["bytes"] <= 10_000
    assert not put(cache, cc, bytes(6000), url="http://o/big")  # beyond max_object


def test_zero_capacity_stores_nothing():
    cache = ResponseCache(max_bytes=0)
    assert not put(cache, [("Cache-Control", "max-age=60")])
    assert get(cache) is None


def test_cache_control_parsing():
    assert cache_control(['max-age=5, No-Store', 'private="x, y"', "max-age=9"]) == {
        "max-age": "5", "no-store": None, "private": "x, y"}


def test_threads_hammering_one_cache_stay_consistent():
    cache = ResponseCache(max_bytes=200_000)
    cc = [("Cache-Control", "max-age=60"), ("Vary", "v")]
    errors = []

    def work(n):
        try:
            for i in range(2000):
                url = f"http://o/{i % 50}"
                req = [("v", str(n % 3))]
                if get(cache, req=req, url=url) is None:
                    put(cache, cc, bytes(1000 + n), req=req, url=url)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = cache.stats()
    assert st["bytes"] <= 200_000 and st["hits"] + st["misses"] == 16_000
    assert st["entries"] == len(cache._lru) and st["bytes"] == sum(e.size for e in cache._lru.values())
