"""Subprocess of tests/test_checkpoint.py: saves checkpoint generation 1 to PATH, then starts
saving generation 2 to the same PATH, writes half of its bytes, touches MARKER and hangs there,
for the test to SIGKILL it inside the write.

Usage: python checkpoint_writer.py PATH MARKER
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from statten.checkpoint import save_checkpoint


def generation(number: int) -> dict[str, Any]:
    """A small checkpoint that says which save wrote it."""
    return {"generation": number, "state_dict": {"weight": torch.full((4096,), float(number))}}


def half_then_hang(marker: Path) -> Callable[[Any, BinaryIO], None]:
    """A ``torch.save`` that writes the first half of the file, signals ``marker`` and hangs."""
    real_save = torch.save

    def save(obj: Any, f: BinaryIO) -> None:
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        f.flush()
        marker.touch()
        time.sleep(600)

    return save


def main(path: str, marker: str) -> None:
    save_checkpoint(generation(1), path)
    torch.save = half_then_hang(Path(marker))
    save_checkpoint(generation(2), path)


if __name__ == "__main__":
    main(*sys.argv[1:])
