# fastgen: `make demo`, `make test`, `make bench`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastgen-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow test-all bench zoo zoo-check clean-venv gpu-bundle

venv: $(STAMP)

# torch is installed first, pinned (an unpinned torch would pull a different multi-GB build),
# then fastgen itself with every dependency held to constraints.txt.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,eval]"
	@touch $(STAMP)

demo: venv
	$(BIN)/fastgen demo

# The default suite plus the slow tests marked `ci` (real end-to-end paths kept under CI's budget), in
# TEST_WORKERS pytest-xdist processes of one thread each (whole files per worker, so a module's fixtures
# are built once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow or ci" -q --durations=15 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-slow: venv
	$(BIN)/python -m pytest -m "slow" -q --durations=15

test-all: venv
	$(BIN)/python -m pytest -m "" -q --durations=25

# The digits suite: sampling speed, then quality (students trained from their recipes when runs/ lacks
# them, reused otherwise) -> benchmarks/results/{digits_quality,sampling_speed}.{json,md} + plots.
bench: venv
	$(BIN)/fastgen bench run benchmarks/suites/digits.yaml --out benchmarks/results

zoo: venv
	$(BIN)/fastgen zoo build

zoo-check: venv
	$(BIN)/fastgen zoo check

clean-venv:
	rm -rf $(VENV)

# Wheels the lent GPU machine's image lacks (benchmarks/gpu/bundle.txt: diffusers & its needs), for
# CPython 3.12 manylinux x86_64 -> benchmarks/gpu/bundle/ (git-ignored; the device call carries it, see
# README "GPU figures"), checked against benchmarks/gpu/image_packages.txt; rewrites
# benchmarks/gpu/bundle_manifest.json. PY=3.11: the same wheels for another Python into
# benchmarks/gpu/bundle-py3.11/. TWIN=1: also the image's torch 2.11 / triton 3.6 / transformers 5.17
# for this machine's Python in benchmarks/gpu/image-twin/ (~0.7 GB), which `DRY_RUN=1 bash
# benchmarks/gpu/run.sh` then runs on. Needs a package index; uses pip only (no venv needed).
gpu-bundle:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu/bundle.py build $(if $(filter-out 3.12,$(PY)),--python $(PY) --dest benchmarks/gpu/bundle-py$(PY))
	$(if $(TWIN),$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu/bundle.py twin)
