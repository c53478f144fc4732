# crashlm: `make demo` runs the main job on the embedded model; `make test` runs the test suite.
# Both create .venv and install everything first (torch first, so pip never pulls a CUDA build).

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 --durations=15
DEMO_DIR ?= runs/demo

.PHONY: install assets browser test test-fast demo bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print(f'torch=={torch.__version__}')" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(BIN)/crashlm fetch

# Debian's Chromium for the report rendering test; without root or apt the test is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "could not install chromium: the report rendering test will be skipped"; \
	else echo "chromium not installed (needs root): the report rendering test will be skipped"; fi

test: assets browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

demo: assets
	$(BIN)/crashlm similarity --task piqa --samples 256 --out $(DEMO_DIR)/similarity
	$(BIN)/crashlm cluster --similarity $(DEMO_DIR)/similarity/similarity.json --out $(DEMO_DIR)/plan

bench-quick: install
	$(BIN)/python benchmarks/bench_cka.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
