# The two commands: `make run` (set up, then start the mesh) and `make test`
# (set up, then run the whole suite). Both work on a fresh machine: they build
# the venv, install every package, and fetch the model themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  := $(or $(LLM_MESH_HOME),$(HOME)/.cache/llm-mesh)/models/SmolLM2-135M-Instruct/.llm-mesh-complete

.PHONY: setup run test test-fast protos lint clean

setup: $(STAMP) $(MODEL)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	@# vLLM's NixlConnector imports `nixl._api` from the `nixl` meta wheel, which
	@# lists nixl-cu12 AND nixl-cu13 as hard deps: install it alone (nixl-cu12,
	@# the real library, comes from pyproject.toml; see the comment there).
	$(PY) -m pip install --no-deps nixl==1.5.1
	@# LMCache for `--kv-offload lmcache` (the `lmcache server` and vLLM's LMCacheMPConnector):
	@# --no-deps, as its declared pins would downgrade protobuf/numpy/opentelemetry and pull
	@# CUDA torch + cupy (GBs); what it runs here needs none of them (pyproject.toml says why).
	$(PY) -m pip install --no-deps lmcache==0.5.6
	@# Beside the CPU torch these break `import transformers` (DESIGN.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

$(MODEL): $(STAMP)
	$(VENV)/bin/llm-mesh model fetch

run: setup
	$(VENV)/bin/llm-mesh up $(ARGS)

test: setup
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

# Everything but the real-vLLM end-to-end tests.
test-fast: setup
	$(VENV)/bin/pytest -ra -m 'not vllm' $(PYTEST_ARGS)

protos: $(STAMP)
	$(PY) protos/generate.py
	cd protos && ../$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
