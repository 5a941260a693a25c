#!/usr/bin/env bash
# Set up rlhf_cli in ./.venv from nothing: a virtual environment, PyTorch, and the package with its test extra and
# the optional integrations the tests exercise (charts, TensorBoard, MLflow, W&B, SLURM through submitit, Optuna
# sweeps).
# TORCH_SPEC picks the PyTorch build (default: the CPU wheel this project is tested with; on a GPU machine use
# TORCH_SPEC=torch to get the CUDA build from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev,plots,tensorboard,mlflow,wandb,slurm,optuna]'
echo "rlhf_cli is set up in .venv ($(.venv/bin/rlhf --version))"
