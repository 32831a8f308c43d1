"""Child processes that cannot outlive their test.

Each command runs in a session (process group) of its own, and whatever ends its use (it exits, it times out,
pytest-timeout's signal or Ctrl-C interrupts the test) kills the whole group: torchrun's workers and any other
grandchild go with it. `stop_processes` does the same for multiprocessing children (spawned worlds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to every process in `process`'s group (it was started with start_new_session=True); none is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(command: list[str], **popen_kwargs):
    """subprocess.Popen(command, **popen_kwargs) in a new session for the with-block; then its group is killed."""
    with subprocess.Popen(command, start_new_session=True, **popen_kwargs) as process:
        try:
            yield process
        finally:
            kill_group(process)


def run(command: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, timeout=timeout), in a new session.

    Raises subprocess.TimeoutExpired (with the output so far) after `timeout` seconds; no process of the command's
    group outlives the call.
    """
    with running(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop_processes(processes) -> None:
    """Kills and reaps the multiprocessing.Process objects still running (a world past its deadline, a test
    interrupted while it waited); each child is a rank with no children of its own."""
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=10)
