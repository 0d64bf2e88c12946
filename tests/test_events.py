"""Event datasets: raw formats, `statten data prepare`, crash safety, splits, transforms, training.

The raw files are written here in the true formats (CIFAR10-DVS AEDAT 2 as SpikingJelly reads
it, N-Caltech101 ATIS 40-bit events), and the expected frames come from an independent NumPy
split-by-number integration.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from statten.cli import main
from statten.data import DatasetNotFoundError, build_dataset, create_datasets
from statten.data.event_cache import Stage, frames_stage_name
from statten.data.event_sources import EVENT_DATASETS, file_digest
from statten.data.event_transforms import Cutout, EventTrivialAugment, RollRotateShear
from statten.data.events import split_indices

REPO = Path(__file__).resolve().parent.parent
CIFAR_RECIPE = REPO / "conf" / "cifar10-dvs" / "2_256_200E_t16_TET.yml"
AEDAT_HEADER = (
    b"#!AER-DAT2.0\r\n"
    b"# This is a raw AE data file - do not edit\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    b"# Timestamps tick is 1 us\r\n"
)
SENSOR = {"cifar10-dvs": (128, 128), "ncaltech101": (180, 240)}
T = 4

Events = dict[str, np.ndarray]


# -- raw formats ------------------------------------------------------------------------------


def random_events(rng: np.random.Generator, n: int, size: tuple[int, int]) -> Events:
    """``n`` events on a ``size`` sensor with increasing timestamps."""
    height, width = size
    return {
        "t": np.sort(rng.integers(0, 1 << 20, n)).astype(np.int64),
        "x": rng.integers(0, width, n),
        "y": rng.integers(0, height, n),
        "p": rng.integers(0, 2, n),
    }


def write_aedat(path: Path, events: Events) -> None:
    """AEDAT 2 as in CIFAR10-DVS: '#' header lines, then big-endian (address, timestamp) uint32.

    Address bits (DVS128): polarity bit 0, x bits 1-7, y bits 8-14. SpikingJelly reports the
    event at x = 127 - y_addr, y = 127 - x_addr with polarity 1 - p_addr, so write the inverse.
    """
    x_addr = 127 - events["y"]
    y_addr = 127 - events["x"]
    p_addr = 1 - events["p"]
    address = (y_addr << 8) | (x_addr << 1) | p_addr
    words = np.stack([address, events["t"]], axis=1).astype(">u4")
    path.write_bytes(AEDAT_HEADER + words.tobytes())


def write_atis_bin(path: Path, events: Events) -> None:
    """N-Caltech101 ATIS: 5 bytes per event, x 8 bits, y 8 bits, polarity 1 bit, time 23 bits."""
    t = events["t"]
    record = np.stack(
        [
            events["x"],
            events["y"],
            (events["p"] << 7) | ((t >> 16) & 0x7F),
            (t >> 8) & 0xFF,
            t & 0xFF,
        ],
        axis=1,
    ).astype(np.uint8)
    path.write_bytes(record.tobytes())


WRITERS = {"cifar10-dvs": (write_aedat, ".aedat"), "ncaltech101": (write_atis_bin, ".bin")}


def expected_frames(events: Events, frames: int, size: tuple[int, int]) -> np.ndarray:
    """Split by number: ``frames`` slices of ``n // frames`` events, the last one taking the
    remainder; per slice, per-polarity per-pixel event counts."""
    n = len(events["t"])
    step = n // frames
    out = np.zeros((frames, 2, *size), dtype=np.int64)
    for j in range(frames):
        lo, hi = j * step, n if j == frames - 1 else (j + 1) * step
        np.add.at(out[j], (events["p"][lo:hi], events["y"][lo:hi], events["x"][lo:hi]), 1)
    return out


def write_raw_dataset(
    root: Path, name: str, counts: dict[str, int], seed: int = 0, reverse: bool = False
) -> dict[str, Events]:
    """Raw recordings ``DIR/extract/...`` of ``counts[class]`` files each; returns the events
    by relative frames path. ``reverse`` creates classes and files in the opposite order."""
    write, suffix = WRITERS[name]
    dataset = EVENT_DATASETS[name]
    rng = np.random.default_rng(seed)
    written = {}
    classes = sorted(counts, reverse=reverse)
    for class_name in classes:
        folder = dataset.raw_root(root) / class_name
        folder.mkdir(parents=True)
        order = sorted(range(counts[class_name]), reverse=reverse)
        for i in order:
            events = random_events(rng, int(rng.integers(2, 400)), SENSOR[name])
            write(folder / f"rec_{i}{suffix}", events)
            written[f"{class_name}/rec_{i}.npz"] = events
    return written


def prepare(root: Path, name: str, *extra: str) -> int:
    return main(["data", "prepare", name, "--root", str(root), "--frames", str(T), *extra])


def cached_frames(root: Path, relative: str, frames: int = T) -> np.ndarray:
    with np.load(root / frames_stage_name(frames) / relative) as data:
        return data["frames"]


def event_cfg(root: Path, name: str, **overrides: object) -> Namespace:
    values = {
        "dataset": name,
        "data_dir": str(root),
        "time_steps": T,
        "img_size": 16,
        "in_channels": 2,
        "hflip": 0.0,
        "seed": 0,
    }
    return Namespace(**{**values, **overrides})


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["cifar10-dvs", "ncaltech101"])
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A prepared synthetic dataset: (name, root, events by relative path)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    events = write_raw_dataset(root, name, {"alpha": 11, "beta": 12, "gamma": 3})
    assert prepare(root, name, "--workers", "1") == 0
    return name, root, events


# -- tests ------------------------------------------------------------------------------------


def test_prepare_writes_spikingjelly_frames_equal_to_numpy_integration(prepared) -> None:
    name, root, events = prepared
    for relative, recording in events.items():
        frames = cached_frames(root, relative)
        np.testing.assert_array_equal(frames, expected_frames(recording, T, SENSOR[name]))
    stage = Stage(root, frames_stage_name(T))
    assert stage.marker_path.is_file() and not stage.journal_path.exists()
    manifest = json.loads(stage.manifest_path.read_text())
    assert manifest["classes"] == {"alpha": 11, "beta": 12, "gamma": 3}
    for relative, entry in manifest["files"].items():
        assert entry["sha256"] == file_digest(stage.folder / relative, "sha256")
    assert (root / "events_np").is_dir()


def test_samples_are_resized_unnormalised_frames_in_reference_split(prepared) -> None:
    name, root, events = prepared
    dataset = EVENT_DATASETS[name]
    train, evaluation = create_datasets(event_cfg(root, name))
    names = {split: [Path(split.dataset.samples[i][0]) for i in split.indices]
             for split in (train, evaluation)}  # fmt: skip
    for class_name, n in {"alpha": 11, "beta": 12, "gamma": 3}.items():
        files = sorted(f"rec_{i}.npz" for i in range(n))
        cut = dataset.train_count(n)
        assert [p.name for p in names[train] if p.parent.name == class_name] == files[:cut]
        assert [p.name for p in names[evaluation] if p.parent.name == class_name] == files[cut:]
    assert len(evaluation) == (2 if name == "cifar10-dvs" else 5)  # ceil vs floor of 0.9 n
    for index, path in enumerate(names[evaluation]):
        frames, label = evaluation[index]
        expected = torch.from_numpy(
            expected_frames(events[f"{path.parent.name}/{path.name}"], T, SENSOR[name])
        ).float()
        resized = F.interpolate(expected, size=(16, 16), mode=dataset.interpolation)
        assert frames.dtype == torch.float32 and frames.shape == (T, 2, 16, 16)
        torch.testing.assert_close(frames, resized, rtol=0, atol=1e-5)
        assert label == sorted({"alpha", "beta", "gamma"}).index(path.parent.name)


def test_loader_batches_are_batch_time_polarity_height_width(prepared) -> None:
    from statten.data import create_eval_loader

    name, root, _ = prepared
    images, targets = next(iter(create_eval_loader(event_cfg(root, name, batch_size=2))))
    assert images.shape == (2, T, 2, 16, 16) and targets.shape == (2,)


@pytest.mark.parametrize("name", ["cifar10-dvs", "ncaltech101"])
def test_splits_do_not_depend_on_directory_creation_order(name: str, tmp_path: Path) -> None:
    counts = {"b_class": 12, "a_class": 11, "Z_class": 10}
    splits = []
    for reverse in (False, True):
        root = tmp_path / str(reverse)
        write_raw_dataset(root, name, counts, reverse=reverse)
        assert prepare(root, name, "--workers", "1") == 0
        train, evaluation = create_datasets(event_cfg(root, name))
        samples = train.dataset.samples
        splits.append(
            [[(Path(samples[i][0]).relative_to(root), samples[i][1]) for i in s.indices]
             for s in (train, evaluation)]
        )  # fmt: skip
    assert splits[0] == splits[1]


def test_split_rule_matches_the_reference_float_arithmetic() -> None:
    cifar, caltech = EVENT_DATASETS["cifar10-dvs"], EVENT_DATASETS["ncaltech101"]
    for n in range(1, 1200):
        assert cifar.train_count(n) == math.ceil(n * 0.9)
        assert caltech.train_count(n) == int(n * 0.9)
    assert (cifar.train_count(1000), caltech.train_count(1000)) == (900, 900)
    targets = [0, 0, 0, 1, 1]
    assert split_indices(targets, lambda n: n - 1, True) == [0, 1, 3]
    assert split_indices(targets, lambda n: n - 1, False) == [2, 4]


@pytest.mark.parametrize("name", ["cifar10-dvs", "ncaltech101"])
def test_event_datasets_need_data_dir_and_two_channels(name: str, tmp_path: Path) -> None:
    from statten.config import ConfigError

    with pytest.raises(DatasetNotFoundError, match="needs --data-dir"):
        create_datasets(Namespace(dataset=name))
    write_raw_dataset(tmp_path, name, {"a": 2})
    assert prepare(tmp_path, name, "--workers", "1") == 0
    with pytest.raises(ConfigError, match="in_channels: 2"):
        build_dataset(event_cfg(tmp_path, name, in_channels=3), training=True)


def test_training_refuses_a_missing_or_other_t_cache(prepared, tmp_path: Path) -> None:
    name, root, _ = prepared
    with pytest.raises(DatasetNotFoundError, match=r"statten data prepare.*--frames 8"):
        build_dataset(event_cfg(root, name, time_steps=8), training=True)
    write_raw_dataset(tmp_path, name, {"a": 2})
    with pytest.raises(DatasetNotFoundError, match="statten data prepare"):
        build_dataset(event_cfg(tmp_path, name), training=True)


def test_truncated_corrupted_or_unmarked_caches_are_detected_and_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "ncaltech101"
    events = write_raw_dataset(tmp_path, name, {"a": 4, "b": 3})
    assert prepare(tmp_path, name, "--workers", "1") == 0
    stage = Stage(tmp_path, frames_stage_name(T))
    target = stage.folder / "a" / "rec_1.npz"
    data = target.read_bytes()

    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetNotFoundError, match=r"truncated.*statten data prepare"):
        build_dataset(event_cfg(tmp_path, name), training=True)
    capsys.readouterr()
    assert prepare(tmp_path, name, "--workers", "1") == 0
    assert f"{stage.folder}: 6 of 7 files up to date, 1 to build" in capsys.readouterr().out
    np.testing.assert_array_equal(
        cached_frames(tmp_path, "a/rec_1.npz"),
        expected_frames(events["a/rec_1.npz"], T, (180, 240)),
    )

    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, wrong content
    target.write_bytes(corrupted)
    assert prepare(tmp_path, name, "--workers", "1") == 0
    assert target.read_bytes() != corrupted
    np.testing.assert_array_equal(
        cached_frames(tmp_path, "a/rec_1.npz"),
        expected_frames(events["a/rec_1.npz"], T, (180, 240)),
    )

    stage.marker_path.unlink()
    (stage.folder / "a" / "stray.npz").write_bytes(b"junk")
    with pytest.raises(DatasetNotFoundError, match=r"incomplete.*statten data prepare"):
        build_dataset(event_cfg(tmp_path, name), training=True)
    capsys.readouterr()
    assert prepare(tmp_path, name, "--workers", "1") == 0
    out = capsys.readouterr().out
    assert "7 of 7 files up to date, 0 to build, 1 stray files removed" in out
    assert len(build_dataset(event_cfg(tmp_path, name), training=False)) == 2


def test_prepare_killed_midway_is_resumed_by_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "cifar10-dvs"
    rng = np.random.default_rng(1)
    events = {}
    for class_name in ("a", "b"):
        folder = tmp_path / "extract" / class_name
        folder.mkdir(parents=True)
        for i in range(25):
            recording = random_events(rng, 20_000, SENSOR[name])
            write_aedat(folder / f"rec_{i}.aedat", recording)
            events[f"{class_name}/rec_{i}.npz"] = recording
    command = [sys.executable, "-c", "import sys; from statten.cli import main; "
               "sys.exit(main(sys.argv[1:]))", "data", "prepare", name, "--root",
               str(tmp_path), "--frames", str(T), "--workers", "1"]  # fmt: skip
    journal = Stage(tmp_path, "events_np").journal_path
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 40
    while not (journal.exists() and journal.read_text().count("\n") >= 5):
        assert process.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert journal.exists() and not Stage(tmp_path, "events_np").marker_path.exists()

    with pytest.raises(DatasetNotFoundError, match="statten data prepare"):
        build_dataset(event_cfg(tmp_path, name), training=True)
    capsys.readouterr()
    assert prepare(tmp_path, name, "--workers", "1") == 0
    out = capsys.readouterr().out
    done = int(out.split("events_np: ")[1].split(" of ")[0])
    assert 4 <= done < 50
    for relative, recording in events.items():
        np.testing.assert_array_equal(
            cached_frames(tmp_path, relative), expected_frames(recording, T, SENSOR[name])
        )
    assert not list(tmp_path.rglob("*.partial-*"))
    assert len(build_dataset(event_cfg(tmp_path, name), training=False)) == 4


def test_missing_or_wrong_archives_are_listed_with_md5_and_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "cat.zip").write_bytes(b"not the real archive")
    assert prepare(tmp_path, "cifar10-dvs") == 2
    err = capsys.readouterr().err
    for file_name, url, md5 in EVENT_DATASETS["cifar10-dvs"].resources():
        assert f"{file_name}  md5 {md5}  {url}" in err
    assert "cat.zip" in err and "wrong MD5" in err and "[missing]" in err
    assert "extract/<class>/*.aedat" in err


def test_checked_archives_are_extracted_and_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spikingjelly.datasets import NCaltech101

    source = tmp_path / "source"
    events = write_raw_dataset(source, "ncaltech101", {"cup": 3, "ant": 2})
    root = tmp_path / "N-Caltech101"
    (root / "download").mkdir(parents=True)
    archive = root / "download" / "Caltech101.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((source / "extract").rglob("*.bin")):
            zipped.write(path, path.relative_to(source / "extract").as_posix())
    md5 = file_digest(archive, "md5")
    resources = [("Caltech101.zip", "https://example.invalid", md5), ("README.txt", "u", "0")]
    monkeypatch.setattr(NCaltech101, "resource_url_md5", classmethod(lambda cls: resources))
    assert prepare(root, "ncaltech101", "--workers", "1") == 0
    assert not (root / "extract.partial").exists()
    for relative, recording in events.items():
        np.testing.assert_array_equal(
            cached_frames(root, relative), expected_frames(recording, T, (180, 240))
        )


def test_unreadable_raw_file_is_a_user_error(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "extract" / "a"
    folder.mkdir(parents=True)
    (folder / "broken.aedat").write_bytes(AEDAT_HEADER + b"\x00\x01\x02")
    assert prepare(tmp_path, "cifar10-dvs", "--workers", "1") == 2
    assert "cannot convert" in capsys.readouterr().err


# -- transforms -------------------------------------------------------------------------------


def scaled_frames(seed: int) -> torch.Tensor:
    """Frames t = (t + 1) * one random image: a transform shared by all frames (and linear, as
    nearest resampling, rolls and zeroing are) keeps frame t = (t + 1) * frame 0."""
    image = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(seed)) + 0.5
    return torch.stack([(t + 1) * image for t in range(5)])


@pytest.mark.parametrize("transform", [Cutout(16), EventTrivialAugment(), RollRotateShear()])
def test_random_transforms_apply_one_draw_to_all_frames(transform) -> None:
    torch.manual_seed(0)
    changed = 0
    for seed in range(40):
        frames = scaled_frames(seed)
        out = transform(frames)
        assert out.shape == frames.shape
        for t in range(5):
            torch.testing.assert_close(out[t], (t + 1) * out[0])
        changed += not torch.equal(out, frames)
    assert changed >= 20


def test_cutout_zeroes_one_square_of_at_most_16_pixels() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        out = Cutout(16)(torch.ones(3, 2, 40, 40))
        zero = (out[0, 0] == 0).nonzero()
        rows, cols = zero[:, 0], zero[:, 1]
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 0 < height <= 16 and 0 < width <= 16 and len(zero) == height * width
        assert torch.equal(out == 0, (out[0, 0] == 0).expand_as(out))


@pytest.mark.parametrize("prepared", ["cifar10-dvs"], indirect=True)
def test_hflip_mirrors_all_training_frames(prepared) -> None:
    _, root, _ = prepared
    flipped = build_dataset(event_cfg(root, "cifar10-dvs", hflip=1.0), training=True)
    plain = build_dataset(event_cfg(root, "cifar10-dvs"), training=True)
    for index in range(3):
        torch.testing.assert_close(flipped[index][0], plain[index][0].flip(-1))


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prepared", ["cifar10-dvs"], indirect=True)
def test_one_tet_epoch_on_cifar10_dvs_then_statten_test(prepared, tmp_path: Path) -> None:
    name, root, _ = prepared
    overrides = ["--data-dir", str(root), "--dim", "32", "--num-heads", "4", "--layer", "1",
                 "--epochs", "1", "--cooldown-epochs", "0", "--batch-size", "4", "--img-size",
                 "16", "--time-steps", str(T), "--chunk-size", "2", "--workers", "0",
                 "--device", "cpu", "--output", str(tmp_path), "--experiment", "tet",
                 "--dvs-aug", "--dvs-trival-aug", "--hflip", "0.5"]  # fmt: skip
    assert main(["train", "-c", str(CIFAR_RECIPE), *overrides]) == 0
    checkpoint = tmp_path / "train" / "tet" / "last.pth.tar"
    config = torch.load(checkpoint, map_location="cpu", weights_only=False)["config"]
    assert config["TET"] and config["dataset"] == name and config["time_steps"] == T
    assert main(["test", "--resume", str(checkpoint), "--data-dir", str(root),
                 "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
