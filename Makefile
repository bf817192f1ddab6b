# The two commands a new user runs (each does all set-up on a fresh machine):
#   make demo   # venv + install, demo data + tiny model, train, evaluate before/after, export
#   make test   # venv + install, the full test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel on this kind of machine; an unpinned torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m data_pipelines.make_demo --out $(DEMO)/assets
	$(VENV)/bin/steptrain train experiment=quickstart \
		model.path=$(DEMO)/assets/model data.train_files=[$(DEMO)/assets/data/train.jsonl] \
		data.eval_files=[$(DEMO)/assets/data/eval.jsonl] output_dir=$(DEMO)/run resume=none
	$(VENV)/bin/steptrain export $$(ls -d $(DEMO)/run/checkpoints/step_* | sort -V | tail -n 1) $(DEMO)/export
	$(PY) -m data_pipelines.demo_report $(DEMO)/run $(DEMO)/export

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) bench/sft.py

clean:
	rm -rf $(DEMO) .pytest_cache
