# Two entry points, both self-contained on a fresh clone:
#   make test        -- create .venv if missing, install, run the whole test suite
#   make quickstart  -- the main job: fetch corpus, tokenizer, preprocess, train on CPU, sample
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: test install quickstart clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned to the CPU build first so no resolver step can pull a CUDA wheel.
$(STAMP): $(PY) setup.py
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing: treat that as a failure, never a pass.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider; status=$$?; \
	if [ $$status -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$status

quickstart: $(STAMP)
	bash examples/quickstart.sh

clean:
	rm -rf $(VENV) build *.egg-info
