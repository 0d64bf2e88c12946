"""Crash-safe caches of event datasets in SpikingJelly's layout, with manifests proving them whole.

``statten data prepare`` writes two stages under the dataset root ``DIR``, each a folder with one
``<class>/<recording>.npz`` per raw recording, exactly where SpikingJelly's dataset classes look:

- ``events_np/``: the events of each recording (keys t, x, y, p), read by SpikingJelly's readers;
- ``frames_number_{T}_split_by_number/``: key ``frames``, ``[T, 2, H, W]`` per-pixel per-polarity
  event counts from SpikingJelly's ``integrate_events_by_fixed_frames_number`` (``split_by=
  'number'``).

Unlike SpikingJelly (int64 / float64 arrays), statten stores every array in the smallest integer
type that holds its values exactly: 3-4x faster to compress and to load, and SpikingJelly's
loaders read the same values (frames as float32).

Next to each stage folder ``S`` statten keeps its bookkeeping, which SpikingJelly ignores:

- ``S.journal``: one JSON line per finished file (size, SHA-256, fingerprint of its source),
  appended as the build goes, so an interrupted build resumes where it stopped;
- ``S.manifest.json``: the finished stage: parameters, per-class counts, per-file size, SHA-256
  and source fingerprint;
- ``S.complete``: the completion marker, holding the SHA-256 of the manifest; it is written
  last and removed before a stage is touched again, so a stage without a valid marker is never
  used for training.

Every output file is written to ``<name>.partial-<pid>`` and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from spikingjelly.datasets import integrate_events_by_fixed_frames_number
from tqdm import tqdm

from statten.data.errors import DatasetNotFoundError
from statten.data.event_sources import EVENT_DATASETS, EventDataset, file_digest

MANIFEST_FORMAT = 1
EVENTS_STAGE = "events_np"
PARTIAL_TAG = ".partial-"

Entry = dict[str, Any]


def frames_stage_name(frames_number: int) -> str:
    """SpikingJelly's folder name for ``frames_number`` frames split by event count."""
    return f"frames_number_{frames_number}_split_by_number"


@dataclass(frozen=True)
class Stage:
    """One cache folder under a dataset root and the paths of its bookkeeping files."""

    root: Path
    name: str

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def manifest_path(self) -> Path:
        return self.root / f"{self.name}.manifest.json"

    @property
    def marker_path(self) -> Path:
        return self.root / f"{self.name}.complete"

    @property
    def journal_path(self) -> Path:
        return self.root / f"{self.name}.journal"

    @property
    def spikingjelly_marker(self) -> Path:
        """SpikingJelly's own "build in progress" marker, which makes its classes refuse."""
        return self.root / f"{self.name}.building"


@dataclass(frozen=True)
class Task:
    """Build ``target`` (relative to the stage folder) from ``source``; ``fingerprint`` is the
    identity of the source, recorded so that a changed source makes the file stale."""

    target: str
    source: Path
    fingerprint: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    partial_path = path.with_name(f"{path.name}{PARTIAL_TAG}{os.getpid()}")
    partial_path.write_bytes(data)
    os.replace(partial_path, path)


def save_npz(path: Path, **arrays: np.ndarray) -> Entry:
    """Atomically write a compressed ``.npz``; return its ``size`` and ``sha256``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    return {"size": len(data), "sha256": sha256_bytes(data)}


def compact(values: np.ndarray) -> np.ndarray:
    """``values`` (integer-valued) in the smallest integer type that holds them exactly."""
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    return values.astype(np.result_type(np.min_scalar_type(low), np.min_scalar_type(high)))


def _load_events(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as events:
        return {key: events[key] for key in ("t", "x", "y", "p")}


def write_events(dataset_name: str, source: Path, target: Path) -> Entry:
    """Read one raw recording with SpikingJelly's reader and cache its events."""
    events = EVENT_DATASETS[dataset_name].read_events(source)
    return save_npz(target, **{key: compact(np.asarray(values)) for key, values in events.items()})


def integrate_frames(
    events: Mapping[str, np.ndarray], frames_number: int, size: tuple[int, int]
) -> np.ndarray:
    """SpikingJelly's split-by-number integration, as exact integer counts.

    Events outside the sensor would silently land on wrong pixels in SpikingJelly's integration,
    so they are an error here.
    """
    height, width = size
    if len(events["x"]) and (events["x"].max() >= width or events["y"].max() >= height):
        raise ValueError(
            f"events outside the {width}x{height} sensor (max x {events['x'].max()}, "
            f"max y {events['y'].max()})"
        )
    return compact(integrate_events_by_fixed_frames_number(events, "number", frames_number, *size))


def write_frames(dataset_name: str, frames_number: int, source: Path, target: Path) -> Entry:
    """Integrate one cached recording into ``frames_number`` frames and cache them."""
    size = EVENT_DATASETS[dataset_name].sensor_size
    frames = integrate_frames(_load_events(source), frames_number, size)
    return save_npz(target, frames=frames)


def _run_task(convert: Callable[[Path, Path], Entry], folder: Path, task: Task) -> Entry:
    """Run one conversion; a file that cannot be read becomes a DatasetNotFoundError."""
    try:
        entry = convert(task.source, folder / task.target)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetNotFoundError(f"cannot convert {task.source}: {err}") from err
    return {"file": task.target, **entry, "source": task.fingerprint}


def _parse_manifest(data: bytes) -> dict[str, Any] | None:
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def _read_manifest(stage: Stage, vouched: bool = True) -> dict[str, Any] | None:
    """The stage's manifest; with ``vouched``, only if its completion marker vouches for it."""
    try:
        data = stage.manifest_path.read_bytes()
        if vouched and stage.marker_path.read_text().strip() != sha256_bytes(data):
            return None
    except OSError:
        return None
    return _parse_manifest(data)


def _journal_header(dataset: EventDataset, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "dataset": dataset.name, "params": dict(params)}


def _read_journal(stage: Stage, header: Mapping[str, Any]) -> dict[str, Entry]:
    """Entries of an interrupted build with the same header; a torn last line is skipped."""
    try:
        lines = stage.journal_path.read_text().splitlines()
    except OSError:
        return {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not records or records[0] != header:
        return {}
    return {r["file"]: r for r in records[1:] if isinstance(r, dict) and "file" in r}


def _known_entries(
    stage: Stage, dataset: EventDataset, params: Mapping[str, Any]
) -> dict[str, Entry]:
    """What previous builds of this stage recorded: the last manifest (vouched for or not), then
    the journal of an interrupted build. Only candidates: each is re-checked against its file."""
    header = _journal_header(dataset, params)
    manifest = _read_manifest(stage, vouched=False)
    entries = {}
    if manifest is not None and all(manifest.get(k) == v for k, v in header.items()):
        entries = {name: {"file": name, **entry} for name, entry in manifest["files"].items()}
    return {**entries, **_read_journal(stage, header)}


def _file_matches(path: Path, entry: Entry, check_hash: bool) -> bool:
    """Whether ``path`` has the recorded size (and, with ``check_hash``, SHA-256)."""
    try:
        if path.stat().st_size != entry["size"]:
            return False
    except OSError:
        return False
    return not check_hash or file_digest(path, "sha256") == entry["sha256"]


def _stage_files(stage: Stage) -> set[str]:
    """All files under the stage folder, relative, with '/' separators."""
    if not stage.folder.is_dir():
        return set()
    return {p.relative_to(stage.folder).as_posix() for p in stage.folder.rglob("*") if p.is_file()}


def _remove_strays(stage: Stage, expected: Iterable[str]) -> int:
    """Delete files not in ``expected`` (stale temporaries, dropped recordings) and empty folders.

    SpikingJelly would otherwise load them as samples or as empty classes.
    """
    strays = _stage_files(stage) - set(expected)
    for name in strays:
        (stage.folder / name).unlink()
    for folder in stage.folder.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return len(strays)


def _class_counts(files: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(name.split("/", 1)[0] for name in files).items()))


def _write_manifest(
    stage: Stage, dataset: EventDataset, params: Mapping[str, Any], entries: Mapping[str, Entry]
) -> dict[str, Any]:
    """Write the manifest, then the marker that vouches for it."""
    files = {
        name: {k: v for k, v in entry.items() if k != "file"}
        for name, entry in sorted(entries.items())
    }
    manifest = {
        **_journal_header(dataset, params),
        "stage": stage.name,
        "classes": _class_counts(files),
        "files": files,
    }
    data = json.dumps(manifest, indent=1).encode()
    _atomic_write(stage.manifest_path, data)
    _atomic_write(stage.marker_path, sha256_bytes(data).encode())
    return manifest


def _start_journal(stage: Stage, header: Mapping[str, Any], entries: Iterable[Entry]) -> None:
    lines = [json.dumps(dict(header)), *(json.dumps(entry) for entry in entries)]
    _atomic_write(stage.journal_path, ("\n".join(lines) + "\n").encode())


def _ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C stops the main process, which shuts the pool down cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _convert_all(
    convert: Callable[[Path, Path], Entry],
    stage: Stage,
    tasks: list[Task],
    workers: int,
) -> Iterable[Entry]:
    """Entries of the converted ``tasks``, in completion order, in ``workers`` processes."""
    run = partial(_run_task, convert, stage.folder)
    if workers <= 1:
        yield from map(run, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_ignore_interrupts) as pool:
        try:
            yield from pool.map(run, tasks, chunksize=4)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def build_stage(
    stage: Stage,
    dataset: EventDataset,
    params: Mapping[str, Any],
    tasks: list[Task],
    convert: Callable[[Path, Path], Entry],
    workers: int,
) -> dict[str, Any]:
    """Bring ``stage`` up to date with ``tasks`` and return its manifest.

    A file is kept when a previous build recorded it from the same source and it still has its
    recorded size and SHA-256; everything else is (re)built. Interrupting this function leaves
    the marker absent and the journal holding the files done so far.
    """
    known = _known_entries(stage, dataset, params)
    valid = {
        t.target: known[t.target]
        for t in tasks
        if t.target in known
        and known[t.target]["source"] == t.fingerprint
        and _file_matches(stage.folder / t.target, known[t.target], check_hash=True)
    }
    targets = [t.target for t in tasks]
    manifest = _read_manifest(stage)
    if (
        manifest is not None
        and len(valid) == len(tasks)
        and set(manifest["files"]) == set(targets) == _stage_files(stage)
    ):
        stage.journal_path.unlink(missing_ok=True)
        stage.spikingjelly_marker.unlink(missing_ok=True)
        print(f"{stage.folder}: all {len(tasks)} files verified", flush=True)
        return manifest
    stage.marker_path.unlink(missing_ok=True)
    stage.folder.mkdir(parents=True, exist_ok=True)
    removed = _remove_strays(stage, targets)
    header = _journal_header(dataset, params)
    _start_journal(stage, header, valid.values())
    pending = [t for t in tasks if t.target not in valid]
    print(
        f"{stage.folder}: {len(valid)} of {len(tasks)} files up to date, {len(pending)} to build"
        + (f", {removed} stray files removed" if removed else ""),
        flush=True,
    )
    entries = dict(valid)
    with (
        stage.journal_path.open("a") as journal,
        tqdm(total=len(pending), desc=stage.name, unit="file") as bar,
    ):
        for entry in _convert_all(convert, stage, pending, workers):
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            entries[entry["file"]] = entry
            bar.update()
    manifest = _write_manifest(stage, dataset, params, entries)
    stage.journal_path.unlink()
    stage.spikingjelly_marker.unlink(missing_ok=True)
    return manifest


def events_params(dataset: EventDataset) -> dict[str, Any]:
    return {"reader": f"{dataset.read_events.__module__}.{dataset.read_events.__name__}"}


def frames_params(dataset: EventDataset, frames_number: int) -> dict[str, Any]:
    height, width = dataset.sensor_size
    return {"frames_number": frames_number, "split_by": "number", "H": height, "W": width}


def _raw_fingerprint(path: Path, raw_root: Path) -> str:
    """Relative path, size and modification time of a raw recording."""
    stat = path.stat()
    return f"{path.relative_to(raw_root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}"


def build_events(
    dataset: EventDataset, root: Path, recordings: Mapping[str, list[Path]], workers: int
) -> dict[str, Any]:
    """Stage ``events_np``: one events file per raw recording; sources fingerprinted by
    relative path, size and modification time."""
    raw_root = dataset.raw_root(root)
    tasks = [
        Task(f"{class_name}/{path.stem}.npz", path, _raw_fingerprint(path, raw_root))
        for class_name, files in recordings.items()
        for path in files
    ]
    convert = partial(write_events, dataset.name)
    stage = Stage(root, EVENTS_STAGE)
    return build_stage(stage, dataset, events_params(dataset), tasks, convert, workers)


def build_frames(
    dataset: EventDataset,
    root: Path,
    events_manifest: Mapping[str, Any],
    frames_number: int,
    workers: int,
) -> dict[str, Any]:
    """Stage ``frames_number_{T}_split_by_number`` from ``events_np``; sources fingerprinted by
    the SHA-256 of their events file."""
    events = Stage(root, EVENTS_STAGE).folder
    tasks = [
        Task(name, events / name, entry["sha256"])
        for name, entry in events_manifest["files"].items()
    ]
    convert = partial(write_frames, dataset.name, frames_number)
    stage = Stage(root, frames_stage_name(frames_number))
    params = frames_params(dataset, frames_number)
    return build_stage(stage, dataset, params, tasks, convert, workers)


def _prepare_hint(dataset: EventDataset, root: Path, frames_number: int) -> str:
    return (
        f"run `statten data prepare {dataset.name} --root {root} --frames {frames_number}` "
        f"(it resumes an interrupted build and rebuilds damaged files)"
    )


def check_frames(dataset: EventDataset, root: Path, frames_number: int) -> dict[str, Any]:
    """The manifest of a complete frames cache, checked quickly (marker, parameters, sizes).

    Raises :class:`DatasetNotFoundError` saying to run ``statten data prepare`` when the cache
    is missing, unfinished, for other parameters, or has a missing or truncated file.
    """
    stage = Stage(root, frames_stage_name(frames_number))
    hint = _prepare_hint(dataset, root, frames_number)
    if not stage.folder.is_dir():
        other = root / dataset.folder
        extra = f"; or did you mean --data-dir {other}?" if other.is_dir() else ""
        raise DatasetNotFoundError(f"{dataset.name}: no frames cache {stage.folder}; {hint}{extra}")
    manifest = _read_manifest(stage)
    if manifest is None:
        raise DatasetNotFoundError(
            f"{dataset.name}: the frames cache {stage.folder} is incomplete (an interrupted or "
            f"unfinished preparation: no valid completion marker); {hint}"
        )
    expected = _journal_header(dataset, frames_params(dataset, frames_number))
    if any(manifest.get(k) != v for k, v in expected.items()):
        raise DatasetNotFoundError(
            f"{dataset.name}: the frames cache {stage.folder} was built for other settings; {hint}"
        )
    for name, entry in manifest["files"].items():
        if not _file_matches(stage.folder / name, entry, check_hash=False):
            raise DatasetNotFoundError(
                f"{dataset.name}: frames file {stage.folder / name} is missing or truncated "
                f"(expected {entry['size']} bytes); {hint}"
            )
    return manifest


def check_spikingjelly_layout(dataset: EventDataset, root: Path, frames_number: int) -> None:
    """Refuse what would make SpikingJelly's class download or rebuild instead of reading."""
    hint = _prepare_hint(dataset, root, frames_number)
    events = Stage(root, EVENTS_STAGE)
    if not events.folder.is_dir():
        raise DatasetNotFoundError(
            f"{dataset.name}: {events.folder} is missing (SpikingJelly needs it); {hint}"
        )
    for stage in (events, Stage(root, frames_stage_name(frames_number))):
        if stage.spikingjelly_marker.exists():
            raise DatasetNotFoundError(
                f"{dataset.name}: {stage.spikingjelly_marker} marks an unfinished SpikingJelly "
                f"build; {hint}"
            )
