"""cpu_runtime: which LD_PRELOAD it adds, and (slow) that vLLM's spawned engine processes load libiomp5
when the driver sets it in os.environ before `LLM()`."""
from pathlib import Path

import pytest

from vllm_sdsat import cpu_runtime

FAKE = Path("/opt/x/lib/libiomp5.so")


@pytest.fixture
def linux_x86(monkeypatch):
    monkeypatch.setattr(cpu_runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_runtime, "libiomp5_path", lambda: FAKE)


def test_preload_env_puts_libiomp5_first(linux_x86):
    assert cpu_runtime.preload_env({}) == {"LD_PRELOAD": str(FAKE)}
    assert cpu_runtime.preload_env({"LD_PRELOAD": "/l/libtcmalloc.so"}) == {"LD_PRELOAD": f"{FAKE}:/l/libtcmalloc.so"}


def test_preload_env_leaves_an_openmp_runtime_alone(linux_x86):
    for lib in ("/t/libgomp.so.1", "/i/libiomp5.so", "/l/libomp.so"):
        assert cpu_runtime.preload_env({"LD_PRELOAD": lib}) == {}


def test_preload_env_needs_the_library_and_linux_x86(linux_x86, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "libiomp5_path", lambda: None)
    assert cpu_runtime.preload_env({}) == {}
    monkeypatch.setattr(cpu_runtime, "libiomp5_path", lambda: FAKE)
    monkeypatch.setattr(cpu_runtime.platform, "machine", lambda: "aarch64")
    assert cpu_runtime.preload_env({}) == {}


@pytest.mark.slow
def test_spawned_engine_processes_load_libiomp5(monkeypatch):
    """Set in the driver's os.environ before LLM(): the engine core and worker map libiomp5 and vLLM
    binds the worker's threads the Intel way (KMP_AFFINITY)."""
    psutil = pytest.importorskip("psutil")
    if cpu_runtime.libiomp5_path() is None:
        pytest.skip("intel-openmp is not installed")
    from vllm import LLM, SamplingParams

    from vllm_sdsat.bench.engine import shutdown
    from vllm_sdsat.paths import EMBEDDED_MODEL

    monkeypatch.delenv("LD_PRELOAD", raising=False)  # restored after the test, whatever vLLM adds
    assert "libiomp5" in cpu_runtime.use_intel_openmp()["LD_PRELOAD"]
    llm = LLM(model=str(EMBEDDED_MODEL), dtype="bfloat16", max_model_len=256, enforce_eager=True)
    try:
        assert llm.generate(["def f(x):"], SamplingParams(max_tokens=4))[0].outputs[0].token_ids
        engines = psutil.Process().children(recursive=True)
        mapped = {p.pid: "libiomp5.so" in Path(f"/proc/{p.pid}/maps").read_text() for p in engines}
        kmp = {p.pid: "KMP_AFFINITY" in p.environ() for p in engines}
    finally:
        shutdown(llm)
    assert len(engines) >= 2 and all(mapped.values()), mapped
    assert any(kmp.values()), kmp
