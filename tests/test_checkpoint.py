"""Checkpoint loading: reference format quirks, clear errors, and refusal of unsafe pickles."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA

import statten
from statten.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    link_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from statten.cli import main
from statten.engine.trainer import _remove_stale_temporaries

OFFICIAL = DATA / "static_statten_official_format.pth.tar"
WRITER = Path(__file__).parent / "checkpoint_writer.py"


class _Payload:
    """Pickles as a call to os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _official_model() -> torch.nn.Module:
    config = statten.model_config_from_checkpoint(read_checkpoint(OFFICIAL))
    return statten.create_model("sdt", **config)


def test_reference_checkpoint_has_namespace_args_and_talking_heads() -> None:
    checkpoint = read_checkpoint(OFFICIAL)
    assert isinstance(checkpoint["args"], argparse.Namespace)
    assert any(k.endswith("talking_heads.weight") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("where", ["args", "state_dict"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "payload_ran"
    checkpoint = read_checkpoint(OFFICIAL)
    if where == "args":
        checkpoint["args"] = _Payload(marker)
    else:
        checkpoint["state_dict"]["evil"] = _Payload(marker)
    path = tmp_path / "evil.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system.*Nothing in the file"):
        statten.load_checkpoint(_official_model(), path)
    assert not marker.exists()


def test_ddp_prefixes_and_bare_state_dicts_load(tmp_path: Path) -> None:
    state = read_checkpoint(OFFICIAL)["state_dict"]
    prefixed = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": prefixed}, path)
    reference = _official_model()
    statten.load_checkpoint(reference, OFFICIAL)
    for source in (path, prefixed, state):
        model = _official_model()
        statten.load_checkpoint(model, source)
        for (name, a), b in zip(
            model.state_dict().items(), reference.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_mismatched_checkpoint_names_keys_and_shapes() -> None:
    config = statten.model_config_from_checkpoint(read_checkpoint(OFFICIAL))
    wider = statten.create_model("sdt", **{**config, "embed_dims": 128})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*patch_embed\.proj_conv\.weight"):
        statten.load_checkpoint(wider, OFFICIAL)
    deeper = statten.create_model("sdt", **{**config, "depths": 3})
    with pytest.raises(CheckpointError, match=r"missing keys .*block\.2\."):
        statten.load_checkpoint(deeper, OFFICIAL)
    statten.load_checkpoint(deeper, OFFICIAL, strict=False)


def test_unreadable_and_configless_checkpoints_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(OFFICIAL.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no model configuration"):
        statten.model_config_from_checkpoint({"state_dict": {}})


def test_reference_args_map_to_what_the_reference_trained() -> None:
    args = argparse.Namespace(**vars(read_checkpoint(OFFICIAL)["args"]))
    args.attention_mode = "SDT"  # ignored by the reference's train.py: it always built STAtten
    args.dataset = "cifar10-dvs"
    config = statten.model_config_from_checkpoint({"args": args})
    assert config["attention_mode"] == "STAtten"
    assert config["dvs_mode"] is True
    assert config["T"] == args.time_steps and config["embed_dims"] == args.dim


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, I am a text file\n", "is a text file, not a PyTorch checkpoint"),
        (b'{"state_dict": {}}', "is a JSON file, not a PyTorch checkpoint"),
        (bytes(range(7, 250)) * 4, "is not a PyTorch checkpoint: its bytes are neither"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14, "is a safetensors file"),
    ],
)
def test_files_that_are_no_checkpoint_are_named_as_such(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(statten.CheckpointError, match=message) as error:
        statten.load_checkpoint(statten.create_model("sdt", embed_dims=64, depths=1), path)
    assert str(path) in str(error.value) and "pickled" not in str(error.value)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    whole = (DATA / "static_statten_official_format.pth.tar").read_bytes()
    path = tmp_path / "cut.pth.tar"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(statten.CheckpointError, match=r"truncated or not written by torch\.save"):
        statten.checkpoint.read_checkpoint(path)


def _statten_format(
    model_config_changes: dict[str, Any] | None = None, **entries: Any
) -> dict[str, Any]:
    """The official weights in statten's own checkpoint format (as the trainer writes it), its
    model configuration updated by ``model_config_changes``, its entries by ``entries``."""
    official = read_checkpoint(OFFICIAL)
    model_config = statten.model_config_from_checkpoint(official)
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": "sdt",
        "model_config": {**model_config, **(model_config_changes or {})},
        "config": {},
        "state_dict": official["state_dict"],
        **entries,
    }


def _official_format(drop: tuple[str, ...] = (), **args_changes: Any) -> dict[str, Any]:
    """The official checkpoint without the entries ``drop``, its ``args`` updated."""
    checkpoint = read_checkpoint(OFFICIAL)
    checkpoint["args"] = argparse.Namespace(**{**vars(checkpoint["args"]), **args_changes})
    return {key: value for key, value in checkpoint.items() if key not in drop}


BAD_CONFIGURATIONS = [
    pytest.param(
        lambda: _statten_format({"bogus": 1}),
        r"sdt models take no argument bogus",
        id="unknown-key",
    ),
    pytest.param(
        lambda: _statten_format({"img_size": None}),
        r"wrong type for img_size=None \(expected int\)",
        id="img_size-None",
    ),
    pytest.param(
        lambda: _statten_format({"depths": "two"}),
        r"wrong type for depths='two' \(expected int\)",
        id="wrong-type",
    ),
    pytest.param(
        lambda: _statten_format(model_config=[64, 2]),
        r"its model_config is a list, not a dict",
        id="model_config-not-a-dict",
    ),
    pytest.param(
        lambda: _statten_format(arch="resnet50"),
        r"unknown model 'resnet50'; statten provides",
        id="unknown-arch",
    ),
    pytest.param(
        lambda: _official_format(img_size=None),
        r"official sdt checkpoint args: .*\(args set to None: img_size\)",
        id="official-img_size-None",
    ),
    pytest.param(
        lambda: _official_format(dim=-1),
        r"embed_dims=-1 is not divisible by num_heads=8",
        id="official-negative-dim",
    ),
    pytest.param(
        lambda: _official_format(drop=("arch",), model="vit_small"),
        r"unknown model 'vit_small'; statten provides",
        id="official-unknown-arch",
    ),
    pytest.param(
        lambda: {**_official_format(), "args": ["--dim", "64"]},
        r"official 'args' is a list, not an argparse.Namespace or a dict",
        id="official-args-not-a-namespace",
    ),
]


@pytest.mark.parametrize(("make_checkpoint", "problem"), BAD_CONFIGURATIONS)
def test_a_bad_model_configuration_is_an_error_naming_the_file(
    tmp_path: Path, make_checkpoint: Callable[[], dict[str, Any]], problem: str
) -> None:
    path = tmp_path / "bad.pth.tar"
    torch.save(make_checkpoint(), path)
    for read in (statten.model_config_from_checkpoint, statten.create_model_from_checkpoint):
        with pytest.raises(CheckpointError, match=problem) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: "), read.__name__


def test_a_configuration_the_model_cannot_be_built_from_is_an_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "negative.pth.tar"
    torch.save(_statten_format({"embed_dims": -8}), path)  # passes the family's checks
    with pytest.raises(CheckpointError, match=r"cannot build sdt .*negative dimension") as error:
        statten.create_model_from_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ")


def test_a_checkpoint_given_as_a_dict_is_named_checkpoint_and_overrides_can_repair_it() -> None:
    statten.create_model_from_checkpoint(_statten_format())
    unsized = _statten_format({"img_size": None})
    with pytest.raises(CheckpointError, match=r"^checkpoint: model configuration: wrong type"):
        statten.create_model_from_checkpoint(unsized)
    assert statten.create_model_from_checkpoint(unsized, img_size=32).img_size == 32


def test_statten_test_of_a_bad_checkpoint_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.pth.tar"
    torch.save(_official_format(img_size=None), path)
    args = ["--resume", str(path), "--dataset", "digits", "--device", "cpu", "--workers", "0"]
    assert main(["test", *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"statten test: error: {path}: ") and "img_size" in lines[0]


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path, marker = tmp_path / "last.pth.tar", tmp_path / "half-written"
    writer = subprocess.Popen([sys.executable, str(WRITER), str(path), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert writer.poll() is None, "the writer ended before pausing inside its second save"
            assert time.time() < deadline, "the writer never reached its second save"
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert read_checkpoint(path)["generation"] == 1
    half_written = tmp_path / f"last.pth.tar.tmp-{writer.pid}"
    assert half_written.stat().st_size > 0
    with pytest.raises(CheckpointError, match=r"truncated or not written by torch\.save"):
        read_checkpoint(half_written)
    _remove_stale_temporaries(tmp_path)  # what the next statten train does first
    assert sorted(tmp_path.iterdir()) == [marker, path]


def _no_hard_links(source: str, destination: str) -> None:
    raise OSError(errno.EPERM, "hard links not supported")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors via /proc")
@pytest.mark.parametrize("writer", ["save", "copy"])
def test_a_checkpoint_is_on_disk_before_its_name_and_its_name_is_on_disk_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    source, path = tmp_path / "source.pth.tar", tmp_path / "last.pth.tar"
    save_checkpoint({"step": 1}, source)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str, destination: str) -> None:
        events.append(("rename", os.path.realpath(source)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if writer == "save":
        save_checkpoint({"step": 2}, path)
    else:
        monkeypatch.setattr(os, "link", _no_hard_links)  # a file system that copies
        link_checkpoint(source, path)
    temporary = os.path.realpath(f"{path}.tmp-{os.getpid()}")
    directory = os.path.realpath(tmp_path)
    assert events == [("fsync", temporary), ("rename", temporary), ("fsync", directory)]
