# The two commands a new user runs (each does all set-up on a fresh machine):
#   make demo   # venv + install, synthetic speech corpus + tiny speech LLM, ASR training, CER before/after, export
#   make test   # venv + install, the full test suite
# Also: make demo-text (the text quickstart), make bench, make lint.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out

.PHONY: setup demo demo-text test lint bench lock clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel on this kind of machine; an unpinned torch pulls a CUDA build.
# constraints.txt is the lock: the exact versions the suite was last run with (pyproject.toml keeps ranges).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==$$(sed -n 's/^pip==//p' constraints.txt)"
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# Refresh the lock on purpose: newest versions pyproject.toml allows, in a scratch venv, then run `make test`.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ echo '# The lock: exact versions the test suite passed with (make lock refreshes it; pyproject.toml keeps ranges).'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^setuptools==' | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .lock-venv

# Speech ASR (Step-Audio 2 layout): DTMF spoken digits -> a tiny encoder (CTC pre-trained, then frozen) ->
# adapter -> a tiny random Qwen2; held-out CER before/after, then an HF export.
demo: setup
	$(PY) -m data_pipelines.make_demo --out $(DEMO)/assets
	$(PY) -m data_pipelines.speech_corpus $(DEMO)/speech --n-train 2000 --n-eval 64
	$(PY) -m data_pipelines.pretrain_audio_encoder $(DEMO)/speech $(DEMO)/encoder --llm-path $(DEMO)/assets/model
	$(VENV)/bin/steptrain train experiment=asr_demo \
		model.llm_path=$(DEMO)/assets/model model.encoder_path=$(DEMO)/encoder \
		data.train_files=[$(DEMO)/speech/asr_train.jsonl] data.eval_files=[$(DEMO)/speech/asr_eval.jsonl] \
		output_dir=$(DEMO)/asr_run resume=none
	$(VENV)/bin/steptrain export $$(ls -d $(DEMO)/asr_run/checkpoints/step_* | sort -V | tail -n 1) $(DEMO)/asr_export
	$(PY) -m data_pipelines.demo_report $(DEMO)/asr_run $(DEMO)/asr_export

# Text: a tiny Qwen2 learns reverse / sort / copy of digit strings from scratch.
demo-text: setup
	$(PY) -m data_pipelines.make_demo --out $(DEMO)/assets
	$(VENV)/bin/steptrain train experiment=quickstart \
		model.path=$(DEMO)/assets/model data.train_files=[$(DEMO)/assets/data/train.jsonl] \
		data.eval_files=[$(DEMO)/assets/data/eval.jsonl] output_dir=$(DEMO)/run resume=none
	$(VENV)/bin/steptrain export $$(ls -d $(DEMO)/run/checkpoints/step_* | sort -V | tail -n 1) $(DEMO)/export
	$(PY) -m data_pipelines.demo_report $(DEMO)/run $(DEMO)/export

test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) bench/sft.py

clean:
	rm -rf $(DEMO) .pytest_cache
