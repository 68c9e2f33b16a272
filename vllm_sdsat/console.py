"""What the `vllm-sdsat` commands show: progress bars and results on the terminal, engine logs in a file.

vLLM engines write start-up warnings from Python loggers and from native libraries (tcmalloc, OpenMP,
Triton), in the driver and in the engine processes it spawns. Only a file-descriptor redirect catches
all of them, so `quiet()` points fds 1 and 2 at a log file for the whole command, and the command
writes its own output through `console.out` / `console.err`, which stay on the terminal.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from vllm_sdsat.paths import CACHE_DIR


class Console:
    def __init__(self):
        self.out = sys.stdout
        self.err = sys.stderr
        self.log_path: Path | None = None

    def print(self, *args, **kwargs) -> None:
        print(*args, file=self.out, flush=True, **kwargs)

    def error(self, message: str, show_log: bool = True) -> None:
        for bar in list(getattr(tqdm, "_instances", ())):  # end any bar the failure interrupted on its own line
            bar.close()
        where = f" (full log: {self.log_path})" if self.log_path and show_log else ""
        print(f"{message}{where}", file=self.err, flush=True)

    def bar(self, iterable=None, **kwargs) -> tqdm:
        """A tqdm bar on the terminal's stderr, whatever fd 2 points to now."""
        return tqdm(iterable, file=self.err, dynamic_ncols=True, **kwargs)

    @contextmanager
    def waiting(self, desc: str):
        """A bar for a blocking call (an engine starting): it shows the seconds elapsed until the call returns."""
        bar = tqdm(desc=desc, total=None, file=self.err, bar_format="{desc}: {elapsed}", dynamic_ncols=True)
        done = threading.Event()

        def tick():
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield bar
        finally:
            done.set()
            ticker.join()
            bar.bar_format = "{desc}: done in {elapsed}"
            bar.close()


console = Console()


@contextmanager
def quiet(command: str, verbose: bool = False, log_dir: Path = CACHE_DIR / "logs"):
    """Send everything written to fds 1 and 2 (this process and the engines it starts) to a log file,
    keeping `console` on the terminal. With verbose=True nothing is redirected."""
    if verbose:
        yield None
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = console.out, console.err, console.log_path
    console.out, opened_out = _terminal(sys.stdout, 1)
    console.err, opened_err = _terminal(sys.stderr, 2)
    console.log_path = log_path
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream, opened in ((console.out, opened_out), (console.err, opened_err)):
            if opened:
                stream.close()
        console.out, console.err, console.log_path = previous


def _terminal(stream, fd: int):
    """(a stream that keeps writing where `stream` writes now, whether it was opened here). A stream on
    another fd, or on none (pytest's capsys), is not touched by the redirect and is returned as is."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False
