"""Peak extra host memory of a call, measured in a fresh subprocess (torch's CPU allocations are invisible to
tracemalloc): reset the process's RSS high-water mark, run once, report VmHWM minus the RSS before the call."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_in_subprocess(setup: str, call: str, warmup: str, timeout: float = 1800) -> float:
    """Runs `setup` (creates inputs) and `warmup` (the same call on a tiny input: loads extensions, starts thread
    pools), then `call` once; returns the peak extra memory of `call` in MiB. glibc's mmap threshold is pinned so
    that large freed blocks go back to the OS and the resident size tracks live memory."""
    code = "\n".join(
        [
            "import gc, json, torch",
            "from benchmarks.memory import _rss_kib",
            setup,
            warmup,
            "gc.collect()",
            "before = _rss_kib('VmRSS:')",
            "open('/proc/self/clear_refs', 'w').write('5')",
            call,
            "print(json.dumps({'peak_extra_mib': (_rss_kib('VmHWM:') - before) / 1024}))",
        ]
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]
