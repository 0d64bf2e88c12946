"""Event-data loading throughput: samples/s per loader worker, training augmentation on.

Writes synthetic raw recordings (uniformly random events, as many per recording as
``--events``), prepares them with ``statten data prepare`` into the layout training reads, then
times the training split: first ``dataset[i]`` in this process (what one loader worker does),
then a DataLoader with ``--workers`` processes. Augmentation: horizontal flip 0.5, Cutout
(``--dvs-aug``), the TrivialAugment-Wide variant (``--dvs-trival-aug``), plus N-Caltech101's
roll/rotate/shear.

    python benchmarks/event_loading.py --dataset cifar10-dvs --frames 16 --workers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from statten.cli import main as statten_main
from statten.data import build_dataset
from statten.data.event_sources import EVENT_DATASETS

AEDAT_HEADER = b"#!AER-DAT2.0\r\n# synthetic recording (statten benchmark)\r\n"


def write_recording(path: Path, dataset: str, rng: np.random.Generator, events: int) -> None:
    """One raw recording of ``events`` random events in the dataset's own file format."""
    height, width = EVENT_DATASETS[dataset].sensor_size
    t = np.sort(rng.integers(0, 1 << 22, events))
    x, y, p = (
        rng.integers(0, width, events),
        rng.integers(0, height, events),
        rng.integers(0, 2, events),
    )
    if dataset == "cifar10-dvs":  # AEDAT 2, DVS128 addresses (SpikingJelly mirrors x and y)
        address = ((127 - x) << 8) | ((127 - y) << 1) | (1 - p)
        path.write_bytes(AEDAT_HEADER + np.stack([address, t], 1).astype(">u4").tobytes())
    else:  # ATIS: x, y, polarity bit + 23-bit time
        fields = [x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF]
        path.write_bytes(np.stack(fields, 1).astype(np.uint8).tobytes())


def write_raw(root: Path, dataset: str, classes: int, per_class: int, events: int) -> None:
    raw_root = EVENT_DATASETS[dataset].raw_root(root)
    suffix = EVENT_DATASETS[dataset].raw_suffix
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = raw_root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            write_recording(folder / f"rec_{i:04d}{suffix}", dataset, rng, events)


def in_process_rate(dataset: Dataset, samples: int) -> float:
    """Samples per second of ``dataset[i]`` in this process (one loader worker's work)."""
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return samples / (time.perf_counter() - start)


def loader_rate(dataset: Dataset, workers: int, batch_size: int) -> float:
    """Samples per second of a shuffling DataLoader pass, after its workers have started."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    write_raw(root, args.dataset, args.classes, args.per_class, args.events)
    start = time.perf_counter()
    command = ["data", "prepare", args.dataset, "--root", str(root), "--frames", str(args.frames)]
    if statten_main([*command, "--workers", str(args.workers)]) != 0:
        raise SystemExit("statten data prepare failed")
    prepare_s = time.perf_counter() - start
    cfg = Namespace(
        dataset=args.dataset,
        data_dir=str(root),
        time_steps=args.frames,
        img_size=args.img_size,
        in_channels=2,
        hflip=0.5,
        dvs_aug=True,
        dvs_trival_aug=True,
    )
    train = build_dataset(cfg, training=True)
    torch.set_num_threads(1)  # as in a loader worker
    per_worker = in_process_rate(train, len(train))
    with_workers = loader_rate(train, args.workers, args.batch_size)
    recordings = args.classes * args.per_class
    return {
        "dataset": args.dataset,
        "frames": args.frames,
        "img_size": args.img_size,
        "events_per_recording": args.events,
        "recordings": recordings,
        "prepare_recordings_per_s": round(recordings / prepare_s, 1),
        "samples_per_s_per_worker": round(per_worker, 1),
        "workers": args.workers,
        "loader_samples_per_s": round(with_workers, 1),
        "sample_shape": list(train[0][0].shape),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(EVENT_DATASETS), default="cifar10-dvs")
    parser.add_argument("--frames", type=int, default=16, help="T (time_steps)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--events", type=int, default=200_000, help="events per recording")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="loader and prepare processes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--root", type=Path, help="keep the data here (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.root is not None:
        result = run(args, args.root)
    else:
        with tempfile.TemporaryDirectory() as folder:
            result = run(args, Path(folder))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
