"""exit_fast: a command's exit keeps everything a normal exit does that anyone can see (exit
status, atexit handlers, threads that are not daemons, buffered output), less the teardown; and it
ends, with an idle thread pool left open (a join without the interpreter's exit signal hung
`ringflow monitor`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from pathlib import Path
    from ringflow.training.process_exit import exit_fast

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late() -> None:
        time.sleep(0.3)
        (out / "thread").write_text("done")

    threading.Thread(target=late).start()  # not a daemon: the exit waits for it
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)  # left open and idle, as Prefect and MLflow leave theirs
    pool.submit(lambda: None).result()
    sys.stdout.write("buffered, no newline")
    exit_fast(sys.argv[2] if sys.argv[2] == "a message" else int(sys.argv[2]))
    """
)


@pytest.mark.parametrize(("status", "code"), [("0", 0), ("3", 3), ("a message", 1)])
def test_exit_fast_keeps_what_a_normal_exit_does(tmp_path: Path, status: str, code: int) -> None:
    p = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path), status], capture_output=True, text=True, timeout=60
    )  # a hang fails here
    assert p.returncode == code, p.stderr
    assert p.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    if status == "a message":
        assert p.stderr.strip() == "a message"
