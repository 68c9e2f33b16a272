"""vLLM's `suffix` method imports Arctic Inference's suffix tree; PyPI has only its sdist, so build just that."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_sdsat.paths import CACHE_DIR

SUFFIX_DIR_NAME = "suffix-decoding"  # CACHE_DIR/<this>/arctic_inference/suffix_decoding/{cache.py,_C*.so}


def suffix_status(cache_dir: Path = CACHE_DIR) -> tuple[bool, str]:
    """(available, how or why not) for vLLM's suffix decoding, which imports arctic_inference."""
    built = cache_dir / SUFFIX_DIR_NAME
    if (built / "arctic_inference" / "suffix_decoding" / "cache.py").is_file() and str(built) not in sys.path:
        sys.path.insert(0, str(built))
        # Engine processes are spawned: they inherit sys.path through multiprocessing and PYTHONPATH.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(built), os.environ.get("PYTHONPATH")]))
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError as e:
        return False, (
            f"arctic_inference is not importable ({e}). PyPI has no wheel of arctic-inference (only sdists, "
            "0.0.1-0.3.0); a full source build pins torch==2.7.0 and installs a vLLM-0.10 plugin into every "
            "vLLM process. Build only its suffix tree with `vllm-sdsat bench --build-suffix` "
            f"(into {built})")
    origin = Path(sys.modules["arctic_inference.suffix_decoding"].__file__).parent
    return True, f"arctic_inference.suffix_decoding from {origin}"


def build_suffix_decoding(cache_dir: Path = CACHE_DIR, version: str = "0.1.1") -> Path:
    """Build only Arctic Inference's suffix tree (the one part vLLM's `suffix` method imports) from the
    arctic-inference sdist on the package index, with nanobind, cmake and a C++20 compiler.

    The result, cache_dir/suffix-decoding/arctic_inference/, holds no vLLM plugin entry point, so it
    changes nothing in engines that do not use suffix decoding. 0.1.1 is the version vLLM names.
    """
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise FileNotFoundError(f"--build-suffix needs `{tool}` on PATH")
    dest = cache_dir / SUFFIX_DIR_NAME
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp)]
        # no build isolation: preparing its metadata would otherwise install torch 2.7 and build grpcio-tools
        subprocess.run(pip + ["--no-build-isolation", "--no-binary", "arctic-inference", f"arctic-inference=={version}"],
                       check=True)
        subprocess.run(pip + ["nanobind==2.9.2"], check=True)
        sdist = next(tmp.glob("arctic_inference-*.tar.gz"))
        shutil.unpack_archive(str(sdist), tmp)
        src = tmp / sdist.name.removesuffix(".tar.gz")
        shutil.unpack_archive(str(next(tmp.glob("nanobind-*.whl"))), tmp / "nb", format="zip")
        build = tmp / "build"
        env = dict(os.environ, PYTHONPATH=str(tmp / "nb"))
        gen = ["-GNinja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src / "csrc" / "suffix_decoding"), "-B", str(build), *gen,
                        f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, env=env)
        if dest.exists():
            shutil.rmtree(dest)
        pkg = dest / "arctic_inference" / "suffix_decoding"
        pkg.mkdir(parents=True)
        (dest / "arctic_inference" / "__init__.py").write_text(
            f'"""Only the suffix tree of arctic-inference {version} (Apache-2.0), built by vllm-sdsat bench."""\n')
        for name in ("__init__.py", "cache.py"):
            shutil.copy(src / "arctic_inference" / "suffix_decoding" / name, pkg / name)
        for so in build.glob("_C*.so"):
            shutil.copy(so, pkg / so.name)
        shutil.copy(src / "LICENSE", dest / "LICENSE")
    return dest
