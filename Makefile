# distil: `make demo` and `make test` set everything up themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel is on disk here; on a GPU machine pass e.g. `make setup TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,models,ct2,onnx,slurm,wandb,mlflow,ggml
# The ONNX exporter (distil-export format=onnx): optimum-onnx pins transformers<4.58 while distil runs
# transformers 5, so it and its own transformers go into a folder of their own that only the export's child
# process puts first on its path (distil/whisper/onnx_export.py); torch, onnx and onnxruntime are the venv's.
ONNX_EXPORTER := $(VENV)/optimum-onnx
ONNX_EXPORTER_PACKAGES := optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 tokenizers==0.22.2 \
	huggingface_hub==0.36.2 requests==2.34.2 charset-normalizer==3.5.3 urllib3==2.8.0 certifi
STAMP := $(VENV)/.distil-installed
# TTS engines and voices for the synthetic corpora; WordNet to regenerate the sentence bank (distil/data/resources).
DEBIAN_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts wordnet-base
FESTIVAL_VOICES := /usr/share/festival/voices/english/kal_diphone /usr/share/festival/voices/english/ked_diphone \
	/usr/share/festival/voices/us/cmu_us_slt_arctic_hts

.PHONY: setup system-packages demo test test-unit test-slow lint format clean-venv

setup: system-packages $(STAMP)

# Checked on every run (a few file tests), so a checkout set up before a package was added gets it too.
system-packages:
	@for need in /usr/bin/espeak-ng /usr/bin/flite /usr/bin/festival $(FESTIVAL_VOICES) /usr/share/wordnet/data.noun; do \
	  test -e $$need && continue; \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; break; \
	done

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
# openai-whisper (format=openai's check and evaluation) declares triton, GPU-only and hundreds of MB: its
# other dependencies (the `openai` extra's) are installed, the package itself without its declared ones.
	$(PY) -m pip install -q tiktoken numba more-itertools
	$(PY) -m pip install -q --no-deps "openai-whisper>=20250625"
	@if [[ ",$(EXTRAS)," == *,onnx,* ]]; then \
	  rm -rf $(ONNX_EXPORTER) && $(PY) -m pip install -q --no-deps --target $(ONNX_EXPORTER) $(ONNX_EXPORTER_PACKAGES); \
	fi
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/distil-pipeline $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# The edit-test loop: pure tests only (no model, no audio synthesis), about half a minute.
test-unit: setup
	$(PY) -m pytest -q -m unit $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check distil tests benchmarks
	$(VENV)/bin/ruff format --check distil tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix distil tests benchmarks
	$(VENV)/bin/ruff format distil tests benchmarks
