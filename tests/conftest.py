"""Shared fixtures and marks: the reference's golden vectors (copied from
../shared/reference/golden), a skip for machines that cannot build the C kernels, and C kernels
that split even the tests' small calls over threads (so that the threaded paths are tested)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from statten.fast import native

DATA = Path(__file__).parent / "data"
GOLDEN_CASES = ("static_statten", "static_sdt")

needs_c_compiler = pytest.mark.skipif(
    native.library() is None, reason="the C kernels could not be built (no C compiler?)"
)


DEFAULT_THREAD_WORK = 1 << 18  # statten_thread_work in statten/fast/lif.c


@pytest.fixture(autouse=True, scope="session")
def _kernels_split_every_call() -> Any:
    if native.library() is not None:
        native.set_thread_work(1)
    yield
    if native.library() is not None:
        native.set_thread_work(DEFAULT_THREAD_WORK)


def golden_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs of a golden case's ``config`` (reference short names)."""
    return {
        "img_size": config["img"],
        "in_channels": config["cin"],
        "num_classes": config["ncls"],
        "embed_dims": config["dim"],
        "num_heads": config["heads"],
        "depths": config["depth"],
        "T": config["T"],
        "chunk_size": config["chunk"],
        "pooling_stat": config["pool"],
        "attention_mode": config["attn"],
        "spike_mode": config["spike"],
        "dvs_mode": config["dvs"],
        "TET": config["tet"],
    }


@pytest.fixture(params=GOLDEN_CASES)
def golden(request: pytest.FixtureRequest) -> dict[str, Any]:
    return torch.load(DATA / f"{request.param}.pt", weights_only=True)
