# hostscript — the two commands a user needs are `make run` and `make test`;
# both set everything up first (system packages when root, Lua archives, .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NATIVE := $(wildcard native/*.c native/*.h) $(shell find src/lua -name '*.lua')
LUA_LIBS := build/lua/lua54/liblua.a build/lua/luajit/libluajit.a

.PHONY: all deps install ats test test-sanitize fuzz run bench clean

all: install

deps:
	sh tools/install-deps.sh

$(LUA_LIBS): tools/build-lua.sh $(wildcard tools/patches/*.patch)
	sh tools/install-deps.sh
	sh tools/build-lua.sh

$(VENV)/.installed: $(LUA_LIBS) $(NATIVE) $(wildcard hostscript/*.c hostscript/*.h) setup.py pyproject.toml hostscript/_build.py tools/embed_lua.py
	sh tools/install-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The Traffic Server plugin (hosts/ats), one per engine: build/ats/hostscript_ats_<engine>.so
ATS_PLUGINS := build/ats/hostscript_ats_lua54.so build/ats/hostscript_ats_luajit.so
ats: $(ATS_PLUGINS)

build/ats/hostscript_ats_%.so: hosts/ats/hostscript_ats.c $(NATIVE) tools/build_c.py $(VENV)/.installed
	@mkdir -p build/ats
	$(PY) tools/build_c.py $* $@ hosts/ats/hostscript_ats.c --plugin

# wrk, nginx-light and valgrind let the benchmark smoke runs and the valgrind checks
# run too (without them, as a user who cannot install them, those tests are skipped)
test: install ats
	-sh tools/install-deps.sh test
	$(PY) -m pytest -q tests

run: install
	$(PY) -m hostscript demo

# The comparison against peers (benchmarks/, run by `hostscript bench`): prints the
# table and its Markdown, writes build/bench.json and build/bench.png.
# `make test` runs only its --quick smoke (tests/test_bench_smoke.py).
# wrk (the load generator of the proxy rows) comes from tools/install-deps.sh bench.
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	sh tools/install-deps.sh bench
	$(PY) -m hostscript bench --markdown --json build/bench.json --plot build/bench.png

# The C thread and limit tests under ASan+UBSan and TSan (tests/test_sanitizers.py, and
# the TSan case of tests/test_txn_entry_points.py); `make test` runs them too.
test-sanitize: install
	$(PY) -m pytest -q tests/test_sanitizers.py

# The atheris fuzz target (tests/fuzz/fuzz_fire.py) for FUZZ_SECONDS, both engines
# (FUZZ_ENGINE=luajit|lua54 for one); the corpus grows in build/fuzz/corpus, crashes
# land in build/fuzz/artifacts (replay: $(PY) tests/fuzz/fuzz_fire.py FILE).
FUZZ_SECONDS ?= 300
FUZZ_ENGINE ?=
FUZZ_FLAGS ?= -timeout=10 -len_control=0 -max_len=2048 -rss_limit_mb=4096
$(VENV)/.fuzz: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[fuzz]'
	touch $@

fuzz: $(VENV)/.fuzz
	mkdir -p build/fuzz/corpus build/fuzz/artifacts
	HS_FUZZ_ENGINE=$(FUZZ_ENGINE) $(PY) tests/fuzz/fuzz_fire.py -max_total_time=$(FUZZ_SECONDS) \
		$(FUZZ_FLAGS) -artifact_prefix=build/fuzz/artifacts/ build/fuzz/corpus tests/fuzz/corpus

clean:
	rm -rf build/c build/bench build/temp* build/lib* hostscript/_lua54*.so hostscript/_luajit*.so hostscript/_bridge*.so $(VENV) *.egg-info
