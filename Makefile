# fastgen: `make demo`, `make test`, `make bench`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastgen-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow test-all bench zoo zoo-check clean-venv

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

# The default suite plus the slow tests marked `ci` (real end-to-end paths kept under CI's budget).
test: venv
	$(BIN)/python -m pytest -m "not slow or ci" -q --durations=15

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
