"""What the `vllm-sdsat` commands show: by default progress bars and the result, with engine logs in a file;
with --verbose the logs themselves. The end-to-end tests run the installed console script, as a user would."""
import os
import re
import subprocess
import sys
from pathlib import Path

from vllm_sdsat.console import console, quiet

# A vLLM log line ("INFO 11-25 05:40:12 [llm.py:123] ...", possibly after "(EngineCore pid=1) "), or a
# native library's start-up warning.
ENGINE_LOG = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR) \d\d-\d\d |tcmalloc|libiomp|Triton",
                        re.MULTILINE)
CLI = [str(Path(sys.executable).with_name("vllm-sdsat"))]


def run_cli(*args, tmp_path):
    env = dict(os.environ, VLLM_SDSAT_CACHE=str(tmp_path / "cache"))
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=900)


def test_quiet_sends_fds_to_the_log_and_keeps_the_console(tmp_path, capfd):
    with quiet("unit", log_dir=tmp_path) as log:
        os.write(1, b"native noise on fd 1\n")
        os.write(2, b"native noise on fd 2\n")
        console.print("the result")
        console.error("it failed")
    shown = capfd.readouterr()
    assert "the result" in shown.out and "it failed" in shown.err and str(log) in shown.err
    assert "noise" not in shown.out + shown.err
    assert log.read_text().splitlines() == ["native noise on fd 1", "native noise on fd 2"]
    os.write(1, b"after\n")  # fds are restored on exit
    assert capfd.readouterr().out == "after\n"


def test_verbose_redirects_nothing(tmp_path, capfd):
    with quiet("unit", verbose=True, log_dir=tmp_path) as log:
        os.write(1, b"native line\n")
    assert log is None and capfd.readouterr().out == "native line\n" and not list(tmp_path.iterdir())


def test_demo_shows_progress_and_result_but_no_engine_logs(tmp_path):
    done = run_cli("demo", "--prompts", "2", "--max-tokens", "16", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "speedup" in done.stdout and "identical outputs: 2/2" in done.stdout
    assert "starting engine" in done.stderr and "generating" in done.stderr  # the bars
    assert not ENGINE_LOG.search(done.stdout + done.stderr), (done.stdout + done.stderr)[:3000]
    logs = list((tmp_path / "cache" / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and ENGINE_LOG.search(logs[0].read_text())  # the engine did log, into the file


def test_verbose_shows_engine_logs(tmp_path):
    done = run_cli("bench", "--verbose", "--quick", "--methods", "none", "--prompts", "1", "--max-tokens", "8",
                   "--batch-sizes", "1", "--output", str(tmp_path / "out"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ENGINE_LOG.search(done.stdout + done.stderr)
    assert not (tmp_path / "cache" / "logs").exists()


def test_failure_prints_its_cause_and_the_log_path(tmp_path):
    # max_model_len 8 is shorter than the smallest HumanEval prompt: vLLM refuses the request.
    done = run_cli("bench", "--quick", "--methods", "none", "--prompts", "1", "--max-model-len", "8",
                   "--batch-sizes", "1", "--output", str(tmp_path / "out"), tmp_path=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("vllm-sdsat bench: error: ") and "full log: " in lines[-1]
    log = Path(lines[-1].rsplit("full log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    assert not ENGINE_LOG.search(done.stdout + done.stderr)
