# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
SHARED ?= ../shared
MODEL ?= $(SHARED)/models/stories260K
TEXTS ?= $(SHARED)/data/texts
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvrecall-installed

.PHONY: install demo test check-stubs stubs bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# Reuse an installed torch; otherwise take the pinned CPU build (never a CUDA one by accident).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q "setuptools>=74" wheel
	$(PY) -m pip install -q -e ".[cpu,test,bench]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvrecall demo --model $(MODEL) --texts $(TEXTS)

test: $(STAMP)
	$(PY) -m pytest -q tests

stubs: $(STAMP)
	$(PY) -m kvrecall.kvstore.stubs --write

check-stubs: $(STAMP)
	$(PY) -m kvrecall.kvstore.stubs --check

bench-quick: $(STAMP)
	$(PY) bench/codec.py --quick --json bench/results/codec-quick.json
	$(PY) bench/rans_native.py --quick --json bench/results/rans-native-quick.json
	$(PY) bench/kvstore.py --quick --json bench/results/kvstore-quick.json
	$(PY) bench/retrieval.py --quick --json bench/results/retrieval-quick.json
	$(PY) bench/kernels.py --quick --json bench/results/kernels-cpu-quick.json

clean:
	rm -rf $(VENV) build *.egg-info
