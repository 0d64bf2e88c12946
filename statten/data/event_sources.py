"""The reference's two event datasets: where their raw recordings come from, how to read them.

A dataset root ``DIR`` follows SpikingJelly's layout (what ``spikingjelly.datasets`` builds and
reads; the reference README's ``data/CIFAR10-DVS`` is such a root):

- ``DIR/download/``: the original archives (names, URLs and MD5s from SpikingJelly's
  ``resource_url_md5()``);
- ``DIR/extract/``: the raw recordings, ``<class>/*.aedat`` for CIFAR10-DVS and
  ``Caltech101/<class>/*.bin`` for N-Caltech101, either extracted by ``statten data prepare`` or
  by the user;
- ``DIR/events_np/`` and ``DIR/frames_number_{T}_split_by_number/``: the caches (see
  :mod:`statten.data.event_cache`).
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from spikingjelly.datasets import CIFAR10DVS, NCaltech101, load_ATIS_bin
from spikingjelly.datasets.cifar10_dvs import _load_origin_data
from torchvision.datasets.utils import extract_archive

from statten.data.errors import DatasetNotFoundError

DOWNLOAD_DIR = "download"
EXTRACT_DIR = "extract"
# Archive-tool artefacts that are not class folders.
IGNORED_NAMES = frozenset({"__MACOSX"})
HASH_CHUNK = 1 << 20

Events = dict[str, np.ndarray]


def cifar10_dvs_train_count(n: int) -> int:
    """Reference (``split_to_train_test_set(0.9, ...)``): ``ceil(0.9 n)``, same float arithmetic."""
    return math.ceil(n * 0.9)


def ncaltech101_train_count(n: int) -> int:
    """Reference (``NCaltech101_aug``): ``int(0.9 n)``, same float arithmetic."""
    return int(n * 0.9)


@dataclass(frozen=True)
class EventDataset:
    """One event dataset: its SpikingJelly class, raw files, reader and reference split/resize.

    ``read_events(path)`` is SpikingJelly's reader of one raw recording (dict of t, x, y, p);
    ``train_count(n)`` how many of a class's ``n`` recordings (sorted by name) are training data;
    ``interpolation`` the resize mode of the reference (``torch.nn.functional.interpolate``).
    """

    name: str
    folder: str
    sj_class: Any
    raw_subdir: str
    raw_suffix: str
    archives: tuple[str, ...]
    read_events: Callable[[str | Path], Events]
    train_count: Callable[[int], int]
    interpolation: str
    num_classes: int

    @property
    def sensor_size(self) -> tuple[int, int]:
        """``(H, W)`` of the sensor, as SpikingJelly integrates frames."""
        return tuple(self.sj_class.get_H_W())

    def resources(self) -> list[tuple[str, str, str]]:
        """``(file name, URL, MD5)`` of the archives this dataset needs, from SpikingJelly."""
        return [r for r in self.sj_class.resource_url_md5() if r[0] in self.archives]

    def raw_root(self, root: Path) -> Path:
        """Folder holding one sub-folder of raw recordings per class."""
        return root / EXTRACT_DIR / self.raw_subdir

    def layout(self, root: Path) -> str:
        """Human-readable description of the expected raw layout under ``root``."""
        return f"{self.raw_root(root)}/<class>/*{self.raw_suffix}"


EVENT_DATASETS: dict[str, EventDataset] = {
    "cifar10-dvs": EventDataset(
        name="cifar10-dvs",
        folder="CIFAR10-DVS",
        sj_class=CIFAR10DVS,
        raw_subdir="",
        raw_suffix=".aedat",
        archives=tuple(r[0] for r in CIFAR10DVS.resource_url_md5()),
        read_events=_load_origin_data,  # SpikingJelly's AEDAT 2 reader for CIFAR10-DVS
        train_count=cifar10_dvs_train_count,
        interpolation="bilinear",
        num_classes=10,
    ),
    "ncaltech101": EventDataset(
        name="ncaltech101",
        folder="N-Caltech101",
        sj_class=NCaltech101,
        raw_subdir="Caltech101",
        raw_suffix=".bin",
        archives=("Caltech101.zip",),
        read_events=load_ATIS_bin,
        train_count=ncaltech101_train_count,
        interpolation="nearest",
        num_classes=101,
    ),
}


def raw_recordings(dataset: EventDataset, root: Path) -> dict[str, list[Path]]:
    """``{class: recordings sorted by name}`` with classes sorted, as SpikingJelly orders them.

    Raises :class:`DatasetNotFoundError` when there are no class folders or a class is empty.
    """
    raw_root = dataset.raw_root(root)
    classes = sorted(
        p.name
        for p in (raw_root.iterdir() if raw_root.is_dir() else ())
        if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_NAMES
    )
    if not classes:
        retry = (
            f" (or delete {root / EXTRACT_DIR} to extract the archives in {root / DOWNLOAD_DIR})"
            if (root / DOWNLOAD_DIR).is_dir()
            else ""
        )
        raise DatasetNotFoundError(
            f"{dataset.name}: no class folders in {raw_root}; expected "
            f"{dataset.layout(root)}{retry}"
        )
    recordings = {
        name: sorted(
            p for p in (raw_root / name).iterdir() if p.is_file() and p.suffix == dataset.raw_suffix
        )
        for name in classes
    }
    empty = [name for name, files in recordings.items() if not files]
    if empty:
        raise DatasetNotFoundError(
            f"{dataset.name}: no *{dataset.raw_suffix} files in class folder(s) {empty} of "
            f"{raw_root}"
        )
    return recordings


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (``md5``, ``sha256``, ...) of a file, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_problem(path: Path, md5: str) -> str | None:
    """Why the archive at ``path`` is unusable (missing, wrong MD5), or None if it is good."""
    if not path.is_file():
        return "missing"
    actual = file_digest(path, "md5")
    return None if actual == md5 else f"wrong MD5 {actual} (incomplete or different download)"


def check_archives(dataset: EventDataset, root: Path) -> list[Path]:
    """The verified archives in ``root/download``; else a DatasetNotFoundError listing each one.

    The error names every needed file with its MD5, its URL and what is wrong with it, and the
    alternative of extracting the archives by hand.
    """
    download = root / DOWNLOAD_DIR
    lines, bad = [], False
    for name, url, md5 in dataset.resources():
        problem = _archive_problem(download / name, md5)
        bad = bad or problem is not None
        lines.append(f"  {name}  md5 {md5}  {url}  [{problem or 'ok'}]")
    if not bad:
        return [download / name for name, _, _ in dataset.resources()]
    raise DatasetNotFoundError(
        f"{dataset.name}: the raw recordings are not in {dataset.layout(root)} and the archives "
        f"in {download} are not all there and intact. Needed archives:\n"
        + "\n".join(lines)
        + f"\nDownload them into {download}/ (or extract them yourself so that "
        f"{dataset.layout(root)} exist) and run the command again."
    )


def extract_archives(dataset: EventDataset, root: Path) -> None:
    """Extract the checked archives into ``root/extract`` (all or nothing).

    Extraction goes to ``extract.partial`` first and is renamed at the end, so an interrupted
    extraction is redone instead of being mistaken for a complete one.
    """
    archives = check_archives(dataset, root)
    partial = root / f"{EXTRACT_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for archive in archives:
        print(f"extracting {archive} ...", flush=True)
        extract_archive(str(archive), str(partial))
    partial.rename(root / EXTRACT_DIR)


def ensure_raw_recordings(dataset: EventDataset, root: Path) -> dict[str, list[Path]]:
    """The raw recordings by class, extracting the archives in ``root/download`` if needed."""
    if not (root / EXTRACT_DIR).exists():
        extract_archives(dataset, root)
    return raw_recordings(dataset, root)
