"""``statten data prepare``: build the frame caches of CIFAR10-DVS and N-Caltech101.

    statten data prepare cifar10-dvs --root data/CIFAR10-DVS [--frames 16 10] [--workers N]
    statten data prepare ncaltech101 --root data/N-Caltech101 --frames 16

The raw recordings come from ``DIR/extract`` when it exists (extracted by hand:
``DIR/extract/<class>/*.aedat`` for CIFAR10-DVS, ``DIR/extract/Caltech101/<class>/*.bin`` for
N-Caltech101), else from the original archives in ``DIR/download``, checked against
SpikingJelly's MD5s and extracted. Then ``DIR/events_np`` and one
``DIR/frames_number_{T}_split_by_number`` per T are written (layout, manifests and markers:
:mod:`statten.data.event_cache`). Running it again resumes an interrupted build, checks every
cached file against its manifest (size and SHA-256) and rebuilds what is missing, damaged or
stale; ``statten train --data-dir DIR`` refuses a cache until this has completed.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from statten.config import ConfigError, StrictParser
from statten.data.event_cache import build_events, build_frames, frames_stage_name
from statten.data.event_sources import EVENT_DATASETS, EventDataset, ensure_raw_recordings

LOCK_FILE = ".statten-prepare.lock"
DEFAULT_FRAMES = (16,)
PREPARE_HELP = (
    "Convert the raw recordings (DIR/extract, else the archives in DIR/download) to "
    "SpikingJelly's DIR/events_np and DIR/frames_number_{T}_split_by_number caches. Rerun it to "
    "resume an interrupted build or repair a damaged cache."
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``statten data``; its only action is ``prepare``."""
    parser = StrictParser(prog="statten data", description="Prepare datasets for statten.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="prepare")
    prepare = actions.add_parser(
        "prepare",
        help="convert an event dataset to SpikingJelly frames, resumably and verifiably",
        description=PREPARE_HELP,
    )
    prepare.add_argument("dataset", choices=sorted(EVENT_DATASETS))
    prepare.add_argument("--root", required=True, type=Path, help="dataset root (= --data-dir)")
    prepare.add_argument(
        "--frames",
        nargs="+",
        type=_positive,
        default=list(DEFAULT_FRAMES),
        metavar="T",
        help="frames per sample to build, the time_steps of the recipes (default: 16)",
    )
    prepare.add_argument(
        "--workers",
        type=_positive,
        default=os.cpu_count() or 1,
        help="conversion processes (default: all CPUs)",
    )
    prepare.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold a lock on ``root`` so that two preparations never write the same cache."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `statten data prepare` is working on {root}") from None
        yield


def _summary(dataset: EventDataset, manifest: dict[str, Any]) -> str:
    """Class, recording and split counts of a finished frames stage."""
    counts = manifest["classes"]
    train = sum(dataset.train_count(n) for n in counts.values())
    total = sum(counts.values())
    line = (
        f"{manifest['stage']}: complete, {len(counts)} classes, {total} recordings "
        f"(reference split: {train} train, {total - train} eval)"
    )
    if len(counts) != dataset.num_classes:
        line += f"; note: {dataset.name} has {dataset.num_classes} classes"
    return line


def prepare(dataset: EventDataset, root: Path, frames: Sequence[int], workers: int) -> None:
    """Build (or resume, or repair) the events cache and the frames caches for ``frames``."""
    with _exclusive(root):
        recordings = ensure_raw_recordings(dataset, root)
        events = build_events(dataset, root, recordings, workers)
        for frames_number in dict.fromkeys(frames):
            manifest = build_frames(dataset, root, events, frames_number, workers)
            print(_summary(dataset, manifest), flush=True)
    stages = ", ".join(frames_stage_name(t) for t in dict.fromkeys(frames))
    print(f"{dataset.name} ready in {root} ({stages}); train with --data-dir {root}")


def main(argv: Sequence[str]) -> None:
    """Entry point of ``statten data ...`` (arguments after ``data``)."""
    args = build_parser().parse_args(list(argv))
    prepare(EVENT_DATASETS[args.dataset], args.root, args.frames, args.workers)
