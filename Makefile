# EVE trainer. Every target sets itself up: the first one run creates .venv (about 2 minutes).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
RUN ?= runs/demo
ARGS ?=
# OpenMP busy-waiting makes small ops up to 400x slower when another process shares the cores.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install browser test test-slow test-all lint curate pretrain-stage1 pretrain-stage2 sft eval demo compare bench clean

install: $(STAMP)

# The pinned torch pair goes first: an unpinned torch would pull other versions from the network.
$(STAMP): setup.py requirements/pins.txt requirements/assets.txt requirements/serve.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c requirements/pins.txt -e ".[train,curate,dev]"
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	# The lmms-eval adapter's tests need lmms-eval's API modules and its CLI on a local task: the package
	# without its long list of task dependencies, then what those import (sacrebleu, pytablewriter,
	# tenacity, filelock 3) (`pip install -e ".[eval]"` installs them all for real evaluations).
	$(PY) -m pip install -q -c requirements/pins.txt --no-deps lmms-eval
	$(PY) -m pip install -q -c requirements/pins.txt loguru pytz evaluate datasets
	$(PY) -m pip install -q -c requirements/pins.txt sacrebleu pytablewriter tenacity "filelock<4"
	# The web chat (extra `serve`): gradio caps pillow below the pinned 13, so its other requirements
	# first, then gradio itself without them (requirements/serve.txt says why that is safe).
	$(PY) -m pip install -q -c requirements/pins.txt -r requirements/serve.txt
	$(PY) -m pip install -q -c requirements/pins.txt --no-deps gradio
	touch $(STAMP)

# Debian's chromium and its driver, for the web chat's browser test (tests/eve/test_serve.py); needs root.
browser:
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-slow: $(STAMP) browser
	$(PY) -m pytest -m slow -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check eve train data_curation tests bench
	$(PY) -m ruff format --check eve train data_curation tests bench

curate: $(STAMP)
	$(PY) -m data_curation.run --config configs/curation/embedded.yaml $(ARGS)

pretrain-stage1: $(STAMP)
	$(PY) train/pretrain_stage1.py --config configs/tiny/stage1.yaml $(ARGS)

pretrain-stage2: $(STAMP)
	$(PY) train/pretrain_stage2.py --config configs/tiny/stage2.yaml $(ARGS)

sft: $(STAMP)
	$(PY) train/sft.py --config configs/tiny/sft.yaml $(ARGS)

eval: $(STAMP)
	$(PY) -m eve.eval --model $(RUN)/sft/export --benchmark easy_vqa --out $(RUN)/eval $(ARGS)

demo: $(STAMP)
	$(PY) -m train.demo --run-dir $(RUN) $(ARGS)

# encoder-free vs encoder-based on the demo's data (ARGS="--quick" or ARGS="--variants eve,llava")
compare: $(STAMP)
	$(PY) -m train.compare --run-dir runs/compare $(ARGS)

bench: $(STAMP)
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache

# one self-contained HTML page about a run directory (make demo writes it too): RUN=runs/demo
.PHONY: report
report: $(STAMP)
	$(PY) -m train.report --run-dir $(RUN) $(ARGS)
