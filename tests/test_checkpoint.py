"""Checkpoint loading: reference format quirks, clear errors, and refusal of unsafe pickles."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from conftest import DATA

import statten
from statten.checkpoint import CheckpointError, read_checkpoint

OFFICIAL = DATA / "static_statten_official_format.pth.tar"


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
