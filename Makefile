# `make demo` and `make test` work on a fresh machine: they create .venv and
# install fastbroker (building its compiled core) with its test and lint extras first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOADGEN := bench/.loadgen-built
SOURCES := pyproject.toml setup.py $(shell find src -name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' -o -name py.typed)
PYTEST_ARGS ?=

.PHONY: install demo lint lint-tools format test test-compiled test-pure bench bench-compare bench-smoke bench-peers soak chaos loadgen clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# setuptools builds in build/ and would ship modules a rename left there
	rm -rf build
	$(PY) -m pip install --quiet '.[test,lint,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastbroker demo

# The lint and type gate (configured in pyproject.toml): the formatter's check, the linter,
# mypy on the package, cython-lint on the .pyx/.pxd/.pxi. Runs all four, then fails if
# any did. cython-lint runs pycodestyle, which it finds on PATH. It installs only when the venv
# lacks the tools, so an edit to the sources does not rebuild the package first (after a change
# to the lint extra, run make install).
LINT_PATHS := src tests bench docs
RUFF_OUT := --output-format=concise
LINT_TOOLS := $(VENV)/bin/ruff $(VENV)/bin/mypy $(VENV)/bin/cython-lint $(VENV)/bin/pycodestyle
lint-tools:
	@for tool in $(LINT_TOOLS); do test -x $$tool || { rm -f $(STAMP); $(MAKE) --no-print-directory install; break; }; done

lint: lint-tools
	@status=0; \
	for step in "ruff format --check $(RUFF_OUT) $(LINT_PATHS)" "ruff check $(RUFF_OUT) $(LINT_PATHS)" "mypy" "cython-lint src bench"; do \
		echo "lint: $$step"; \
		PATH="$(abspath $(VENV))/bin:$$PATH" $$step || status=1; \
	done; \
	if [ $$status -ne 0 ]; then echo "lint: failed (make format fixes formatting and import order; the rest is by hand)"; fi; \
	exit $$status

# Rewrites files: the safe lint fixes (import order, ...), then the formatter.
format: lint-tools
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# The lint gate, then the whole suite twice: on the compiled core (which must be
# the one loaded), then on the pure-Python core; then every benchmark once, untimed.
test: lint test-compiled test-pure bench-smoke

test-compiled: $(STAMP)
	FASTBROKER_REQUIRE_COMPILED=1 $(PY) -m pytest $(PYTEST_ARGS)

test-pure: $(STAMP)
	FASTBROKER_PURE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) $(LOADGEN)
	$(PY) -m pytest bench --benchmark-only $(PYTEST_ARGS)

# A regression check between two commits: run the benchmarks, save the run
# (.benchmarks/), and compare it with the last saved one; fail if a median got more
# than BENCH_COMPARE_FAIL slower. The first run only saves. BENCH_ARGS narrows it
# (e.g. BENCH_ARGS="bench/test_core_ops.py -k compiled").
BENCH_COMPARE_FAIL ?= median:10%
BENCH_ARGS ?= bench
bench-compare: $(STAMP)
	@if ls .benchmarks/*/*.json >/dev/null 2>&1; then \
		$(PY) -m pytest $(BENCH_ARGS) --benchmark-only --benchmark-autosave --benchmark-compare \
			--benchmark-compare-fail=$(BENCH_COMPARE_FAIL) --benchmark-columns=median,rounds; \
	else \
		echo "bench-compare: no saved run yet: this one is saved, the next one is compared with it"; \
		$(PY) -m pytest $(BENCH_ARGS) --benchmark-only --benchmark-autosave --benchmark-columns=median,rounds; \
	fi

# Every benchmark once, untimed and small (about 10 s), so `make test` (and CI) sees a
# broken benchmark; the figures come from `make bench`.
bench-smoke: $(STAMP) $(LOADGEN)
	FASTBROKER_BENCH_N=500 FASTBROKER_BENCH_K=500 FASTBROKER_BENCH_ROUNDS=1 \
	FASTBROKER_DEPTH_DEPTHS=10,10000 FASTBROKER_DEPTH_ROUNDS=2 FASTBROKER_BURST_N=500 FASTBROKER_USER_N=500 \
	FASTBROKER_LOAD_N=5000 FASTBROKER_PEERS_N=200 FASTBROKER_PEERS_RTT=5 FASTBROKER_ZC_N=20 \
	$(PY) -m pytest bench -q -p no:cacheprovider --benchmark-disable

# fastbroker beside Dramatiq, Celery, RQ (on Redis) and NATS JetStream, one workload, one run
# (bench/test_peers.py; bench/README.md, "Peers"): installs the bench-peers extra's packages into the
# venv (not '.[bench-peers]', which would build fastbroker again) and Debian's redis-server and
# nats-server when missing (apt-get: root), then runs only those benchmarks, where a missing peer
# fails instead of skipping; the JSON, its table and its chart go to bench/results-out/ (git-ignored).
# About 10 minutes on 2 cores; FASTBROKER_PEERS_N (20000 jobs) and PYTEST_ARGS (e.g. -k 1proc) narrow it.
PEERS_STAMP := $(VENV)/.peers-installed
PEERS_OUT := bench/results-out
bench-peers: $(PEERS_STAMP)
	@command -v redis-server >/dev/null && { command -v nats-server || test -x /usr/sbin/nats-server; } >/dev/null \
		|| { apt-get update && apt-get install -y redis-server nats-server; }
	mkdir -p $(PEERS_OUT)
	FASTBROKER_PEERS_REQUIRED=1 $(PY) -m pytest bench/test_peers.py -p no:cacheprovider --benchmark-only \
		--benchmark-group-by=group --benchmark-columns=median,rounds --benchmark-json=$(PEERS_OUT)/peers.json $(PYTEST_ARGS)
	$(PY) -m bench.peers.table $(PEERS_OUT)/peers.json | tee $(PEERS_OUT)/peers.md
	$(PY) -m bench.plot $(PEERS_OUT)/peers.json -o $(PEERS_OUT)/peers.png --log --title "fastbroker and its peers"

$(PEERS_STAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench-peers"]))' > $(VENV)/bench-peers.txt
	$(PY) -m pip install --quiet -r $(VENV)/bench-peers.txt
	touch $(PEERS_STAMP)

# Hostile input, long: 1,000,000 messages at a broker (compiled core) that must stay
# up, answer a good client right and not grow; see bench/README.md. Options in
# SOAK_ARGS win (e.g. make soak SOAK_ARGS="--core pure").
soak: $(STAMP)
	$(PY) -m bench.soak --messages 1000000 --core compiled $(SOAK_ARGS)

# The crash soak (issue 18): a durable broker SIGKILLed and restarted 3 times, pool
# children SIGKILLed every 0.1-0.2 s, 5,000 jobs; then the same without a store and
# with FBC01 clients and FBW01 workers; each against the calm rate of the same pool. Exits non-zero on
# any wrong, lost or twice-answered job, or a rate below 0.1x calm; last, two durable
# brokers (shards) killed in turn, the pool and client given both. Options in
# CHAOS_ARGS are added to each run.
chaos: $(STAMP)
	$(PY) -m bench.chaos --store --min-ratio 0.1 $(CHAOS_ARGS)
	$(PY) -m bench.chaos --no-store --min-ratio 0.1 $(CHAOS_ARGS)
	$(PY) -m bench.chaos --store --protocol 1 --min-ratio 0.1 $(CHAOS_ARGS)
	$(PY) -m bench.chaos --store --shards 2 --broker-kills 4 --min-ratio 0.1 $(CHAOS_ARGS)

# The compiled load generators of bench/e2e.py and bench/test_broker_load.py
# (bench/_loadgen.pyx), built in place when their sources change; like the core, they
# use pyzmq's own libzmq (no second libzmq is linked).
loadgen: $(LOADGEN)

$(LOADGEN): $(STAMP) bench/_loadgen.pyx bench/build_loadgen.py src/fastbroker/_zmqdl.h src/fastbroker/_zmqdl.pxd src/fastbroker/_protocol.pxd
	$(PY) -m pip install --quiet 'Cython>=3' 'setuptools>=77'
	$(PY) bench/build_loadgen.py
	touch $(LOADGEN)

clean:
	rm -rf $(VENV) build src/*.egg-info src/fastbroker/_core.c src/fastbroker/*.so bench/_loadgen.c bench/*.so $(LOADGEN) .pytest_cache .benchmarks .mypy_cache .ruff_cache
