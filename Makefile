# vtprune: `make demo` runs the main job, `make test` the test suite. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# lmms-eval for its tests, the CPU route of docs/experiments.md#lmms-eval: no dependencies (they pull
# torchvision and a CUDA torch), then the few modules it imports (filelock<4: lmms-eval 0.7.1-0.7.3 break with 4)
LMMS_EVAL := lmms-eval==0.7.3
LMMS_EVAL_IMPORTS := 'filelock<4' accelerate loguru sacrebleu evaluate pytz tenacity pytablewriter

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,video]'
	$(PY) -m pip install --quiet --no-deps '$(LMMS_EVAL)'
	$(PY) -m pip install --quiet $(LMMS_EVAL_IMPORTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtprune demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info
