"""The CPU runtime libraries vLLM's CPU worker asks for in `LD_PRELOAD`: Intel OpenMP (libiomp5).

vLLM's CPU worker warns when "libiomp" is not in `LD_PRELOAD` (`v1/worker/cpu_worker.py`,
`init_device`), and louder with speculative decoding; with libiomp5 preloaded vLLM's
`OMPProcessManager` binds the worker's threads with KMP_AFFINITY instead of GOMP_CPU_AFFINITY, and
its CPU platform no longer preloads torch's libgomp. PyPI's `intel-openmp` installs libiomp5.so into
the environment's `lib/`.

`LD_PRELOAD` only acts when a process starts. vLLM spawns its engine core and workers (the CPU
platform forces `spawn`), so setting it in `os.environ` before `vllm.LLM(...)` reaches them; the
driver process itself keeps the runtime it started with. Cost: a file lookup, no import of vLLM.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path


def libiomp5_path() -> Path | None:
    """libiomp5.so of the installed `intel-openmp` distribution, or None."""
    try:
        files = importlib.metadata.files("intel-openmp") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libiomp5.so":
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    return None


def preload_env(environ: dict | None = None) -> dict[str, str]:
    """The environment additions ({"LD_PRELOAD": ...}) that put libiomp5 in front of what `environ`
    (default os.environ) preloads; {} off Linux x86-64, without intel-openmp, or when an OpenMP
    runtime is preloaded already (vLLM refuses libiomp5 together with libgomp)."""
    environ = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    current = environ.get("LD_PRELOAD", "")
    if any(name in current for name in ("libiomp", "libgomp", "libomp")):
        return {}
    lib = libiomp5_path()
    if lib is None:
        return {}
    return {"LD_PRELOAD": ":".join(p for p in (str(lib), current) if p)}


def use_intel_openmp() -> dict[str, str]:
    """Apply `preload_env()` to os.environ (call before the first `vllm.LLM`); returns what it set."""
    extra = preload_env()
    os.environ.update(extra)
    return extra
