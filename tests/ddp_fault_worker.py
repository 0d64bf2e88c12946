"""One rank of a 2-process ``statten train`` in tests; rank 1 fails at its third step.

Usage: ddp_fault_worker.py FAULT TRAIN_ARGS...; FAULT ``hang`` stops rank 1 answering (it sleeps),
``exit`` ends rank 1 at once. Exits with ``statten train``'s status.
"""

import os
import sys
import time

from statten.cli import main
from statten.engine.trainer import Trainer

FAILING_STEP = 3


def failing(train_step, fault: str):
    """``Trainer.train_step`` that fails as ``fault`` says at step ``FAILING_STEP``."""

    def step(self: Trainer, images, targets) -> float:
        if self.progress.step == FAILING_STEP:
            if fault == "hang":
                time.sleep(3600)
            os._exit(1)
        return train_step(self, images, targets)

    return step


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "1":
        Trainer.train_step = failing(Trainer.train_step, fault)
    sys.exit(main(["train", *argv]))
