# Set-up is automatic: `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: on the dev machines pip takes it from a local CPU wheel;
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The default run: prepare the bundled corpus, train the tiny preset, score the test split,
# then print a short sample from the trained model.
DEMO_DATA := data/tiny-shakespeare
DEMO_RUN := runs/demo

demo: $(STAMP)
	@test -d $(DEMO_DATA) || $(PY) -m allattn prepare tiny-shakespeare --out $(DEMO_DATA)
	$(PY) -m allattn train --preset tiny --data $(DEMO_DATA) --out $(DEMO_RUN) --force
	$(PY) -m allattn eval --checkpoint $(DEMO_RUN) --split test
	$(PY) -m allattn generate --checkpoint $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 300 \
		--temperature 0.8 --seed 0

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks reproduction
	$(VENV)/bin/ruff format --check src tests examples benchmarks reproduction
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format src tests examples benchmarks reproduction
	$(VENV)/bin/ruff check --fix src tests examples benchmarks reproduction

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
