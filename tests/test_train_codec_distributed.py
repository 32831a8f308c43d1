"""DDP codec training under torchrun: 2 gloo processes on tiny data train, checkpoint, resume and evaluate."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from subprocess_util import run
from test_train_codec import TINY, write_tones

from models import train_codec

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 150  # per torchrun; the test runs two, so its pytest timeout is above 2 x this


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "models.train_codec", "train", *args, "--dist-timeout", "60"]
    try:  # in a session of its own: a timeout kills torchrun and its workers, not torchrun alone
        result = run(command, timeout=RUN_TIMEOUT_S, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as timeout:
        output = (timeout.stderr or "")[-6000:]
        pytest.fail(f"torchrun ran past {RUN_TIMEOUT_S} s; its process group, workers included, was killed:\n{output}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_torchrun_two_processes_train_checkpoint_resume(tmp_path):
    audio = tmp_path / "audio"
    write_tones(audio, count=6)
    out = tmp_path / "run"
    common = ["--out", str(out), "--audio-dir", str(audio), "--valid-fraction", "0.2", "--lambda-mmd", "1.0", *TINY]
    _torchrun(common + ["--steps", "2", "--checkpoint-every", "1"])
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 2
    report = json.loads((out / "eval.json").read_text())
    assert math.isfinite(report["mel_distance"]) and math.isfinite(report["si_snr_db"])

    _torchrun(common + ["--steps", "3"])  # resumes at step 2 on both ranks
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3], "only rank 0 logs, once per step"
    assert all(math.isfinite(r[name]) for r in records for name in ("total", "mel", "mmd"))
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3


class _Clips:
    """Stands in for AudioClips: item i is the tensor [i]."""

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return torch.tensor([index])

    def set_epoch(self, epoch):
        pass


def test_ranks_take_disjoint_slices_of_the_same_order():
    def first_batches(rank):
        batches = train_codec._batches(_Clips(10), 2, torch.Generator().manual_seed(0), 0, rank=rank, world=2)
        return [next(batches)[0].flatten().tolist() for _ in range(4)]

    rank0, rank1 = first_batches(0), first_batches(1)
    for a, b in zip(rank0, rank1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    # per epoch of 10 clips: 2 global batches of 4, every clip at most once
    epoch0 = rank0[0] + rank0[1] + rank1[0] + rank1[1]
    assert len(set(epoch0)) == 8
