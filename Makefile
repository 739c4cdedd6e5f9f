# Benchmarks (see benchmarks/README.md). PYTHON defaults to the project's virtual environment when present.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)

.PHONY: bench bench-full bench-smoke

bench:  ## every benchmark at the gemma-3-270m shape, ~20 min on 2 idle CPU cores
	$(PYTHON) benchmarks/run_all.py

bench-full:  ## the real Gemma shapes (270m and 1b) with more steps; hours on a CPU
	$(PYTHON) benchmarks/run_all.py --full

bench-smoke:  ## the benchmarks' smoke test (tiny model, 1-2 steps)
	$(PYTHON) -m pytest -q tests/test_bench_smoke.py
