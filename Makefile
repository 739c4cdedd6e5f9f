# Benchmarks (see benchmarks/README.md). PYTHON defaults to the project's virtual environment when present.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)

.PHONY: bench bench-full bench-smoke mutate

bench:  ## every benchmark at the gemma-3-270m shape, ~20 min on 2 idle CPU cores
	$(PYTHON) benchmarks/run_all.py

bench-full:  ## the real Gemma shapes (270m and 1b) with more steps; hours on a CPU
	$(PYTHON) benchmarks/run_all.py --full

bench-smoke:  ## the benchmarks' smoke test (tiny model, 1-2 steps)
	$(PYTHON) -m pytest -q tests/test_bench_smoke.py

# Mutation testing (cosmic-ray; `pip install -e '.[mutate]'`). Targets, module paths and each one's
# fast tests: mutation/targets.toml; the driver and how it works: mutation/run.py. Runs in a copy
# under build/mutate/ (the working tree is never mutated); each target's summary, with every
# surviving mutant's diff, is build/mutate/NAME/summary.txt. One target: make mutate TARGETS=batching;
# only the last run's survivors again: make mutate TARGETS=batching MUTATE_FLAGS=--survivors.
# cosmic-ray rather than mutmut 3: mutmut forks every mutant's test run from a process that has already
# imported MLX, and in its default fork mode every mutant timed out (MLX's CPU worker threads do not
# survive a fork); cosmic-ray starts one fresh pytest process per mutant.
# One target takes 3-15 min on 2 CPU cores (the sampling and train-loop targets longer); all of them, hours.
mutate:  ## mutation testing, target by target (TARGETS=...; `python mutation/run.py --list`)
	$(PYTHON) mutation/run.py $(MUTATE_FLAGS) $(TARGETS)
