"""hostscript against its peers — pure Python handlers, lupa, a bare lua_pcall.

Not part of the installed package: ``hostscript bench`` (hostscript/cli.py) imports
it from the source tree, and ``pytest benchmarks/`` runs the same workloads under
pytest-benchmark. One concern per module:

- workloads.py   the request, the Lua handler classes and their Python twins
- contestants.py python, lupa and hostscript serving one request each
- timing.py      interleaved rounds, medians
- http_server.py R3: ThreadingHTTPServer with and without hooks
- new_threads.py R4 first fire on a new thread, heap per state, RSS over thread churn
- scaling.py     2 threads against 1
- native.py      the C programs (c/fire_bench.c, c/redis_bench.c): build and run
- proxy_wrk.py   P1-P3: hostscript serve as a process under wrk, in front of origin.py
- redis_ops.py   D1/D2: shared dictionaries in Redis against redis-benchmark (also
                 runnable on its own: python benchmarks/redis_ops.py)
- rows.py        every row: measure, compare, check against its target
- report.py      the report model; text, Markdown, JSON and plot
- runner.py      run everything and print it (what `hostscript bench` calls)
"""
