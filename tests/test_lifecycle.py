"""The life of a training process: stopped by signals, resumed exactly."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import SMALL, assert_identical, train, weights

from statten.checkpoint import read_checkpoint
from statten.cli import main
from statten.config import parse_config
from statten.engine.distributed import DistributedContext, leave_group_after
from statten.engine.trainer import Trainer

STATTEN = shutil.which("statten", path=str(Path(sys.executable).parent))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
STOPPABLE = [*SMALL, "--epochs", "1", "--recovery-interval", "0", "--log-interval", "1"]


def start_training(command: list[str], run: Path) -> subprocess.Popen:
    """Start ``command`` (a ``statten train`` writing to ``run``) and return once it trains."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    log, deadline = run / "log.txt", time.time() + 120
    while not (log.exists() and "epoch 0 [" in log.read_text()):  # a progress line: under way
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "no training progress within 120 s"
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, signum: int) -> tuple[int, list[str]]:
    """Send ``signum``; the exit status and the lines that report a stop."""
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, [line for line in err.splitlines() if "stopped by" in line]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_training_with_a_recovery_checkpoint_that_resumes_exactly(
    tmp_path: Path, signum: int, status: int
) -> None:
    run = tmp_path / "train" / "stopped"
    args = [*STOPPABLE, "--output", str(tmp_path)]
    process = start_training([STATTEN, "train", *args, "--experiment", "stopped"], run)
    returncode, reports = stop(process, signum)
    recovery = run / "recovery.pth.tar"
    assert returncode == status
    name = signal.Signals(signum).name
    assert len(reports) == 1 and reports[0].startswith(f"statten train: stopped by {name} at ")
    assert reports[0].endswith(f"recovery checkpoint: {recovery}; "
                               f"resume with: statten train --resume {recovery}")  # fmt: skip
    assert read_checkpoint(recovery)["progress"]["batch_in_epoch"] > 0
    if signum == signal.SIGINT:
        return  # SIGTERM's run checks the resume: one is enough
    assert main(["train", *SMALL, "--epochs", "1", "--resume", str(recovery)]) == 0
    straight = train(tmp_path, "--epochs", "1", name="straight")
    assert_identical(weights(straight / "last.pth.tar"), weights(run / "last.pth.tar"))


def torchrun_training(tmp_path: Path, *args: str) -> None:
    """Two Gloo processes of ``statten train`` (tests/ddp_worker.py) to the end."""
    worker = [str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path)]
    command = [*TORCHRUN, *worker, *SMALL, "--epochs", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    """torchrun forwards SIGTERM to its workers, which agree on the step to stop at."""
    run = tmp_path / "train" / "stopped"
    args = [*STOPPABLE, "--output", str(tmp_path)]
    process = start_training([*TORCHRUN, STATTEN, "train", *args, "--experiment", "stopped"], run)
    returncode, reports = stop(process, signal.SIGTERM)
    assert returncode != 0  # torchrun reports the signal it received as its own failure
    assert len(reports) == 1 and "stopped by SIGTERM" in reports[0]  # from rank 0 only
    recovery = run / "recovery.pth.tar"
    assert recovery.is_file(), (reports, sorted(p.name for p in run.iterdir()))
    assert read_checkpoint(recovery)["progress"]["batch_in_epoch"] > 0
    torchrun_training(tmp_path, "--resume", str(recovery))
    torchrun_training(tmp_path, "--output", str(tmp_path), "--experiment", "straight")
    straight = tmp_path / "train" / "straight"
    assert_identical(weights(straight / "last.pth.tar"), weights(run / "last.pth.tar"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["hang", "exit"])
def test_a_rank_that_hangs_or_dies_stops_the_other_with_one_clear_line(
    tmp_path: Path, fault: str
) -> None:
    """Two Gloo processes started by hand (torchrun would end the survivor itself)."""
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    environment |= {"WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    worker = [sys.executable, str(Path(__file__).parent / "ddp_fault_worker.py"), fault]
    args = [*SMALL, "--epochs", "1", "--dist-timeout", "10", "--output", str(tmp_path)]
    start = time.time()
    ranks = [
        subprocess.Popen([*worker, *args], env={**environment, "RANK": str(rank)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        _, err = ranks[0].communicate(timeout=120)
        elapsed = time.time() - start
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("statten train: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "rank 0: lost contact with the other processes (" in errors[0]
    assert "--dist-timeout 10 s" in errors[0]
    assert elapsed < 60  # start-up, three steps and at most the 10 s timeout


def test_a_mid_epoch_resume_never_loads_the_batches_already_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampler starts after them (the SIGTERM test above shows the resume is still exact)."""
    trainer = Trainer(
        parse_config(SMALL, "train"), DistributedContext(0, 1, 0, torch.device("cpu"))
    )
    trainer.build_data()
    loader = trainer.train_loader
    epoch_0 = list(loader.sampler)[: len(loader) * loader.batch_size]  # drop_last
    loaded: list[int] = []
    get_item = type(loader.dataset).__getitem__

    def counted(dataset: object, index: int) -> object:
        loaded.append(index)
        return get_item(dataset, index)

    monkeypatch.setattr(type(loader.dataset), "__getitem__", counted)
    monkeypatch.setattr(trainer, "train_step", lambda images, targets: 0.0)
    trainer.progress.batch_in_epoch = done = 5
    trainer.train_one_epoch(0)
    assert loaded == epoch_0[done * loader.batch_size :]


@pytest.mark.parametrize("fails", [False, True])
def test_a_rank_waits_for_the_others_before_leaving_the_group_unless_it_failed(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """Leaving Gloo's group while a peer still uses it can abort that peer at exit."""
    calls: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("leave"))
    ctx = DistributedContext(0, 2, 0, torch.device("cpu"))
    with pytest.raises(KeyError) if fails else contextlib.nullcontext(), leave_group_after(ctx):
        if fails:
            raise KeyError("a peer is gone")
    assert calls == (["leave"] if fails else ["barrier", "leave"])
