"""Run by tests under torchrun: train, then save this rank's final weights to OUT/rank{r}.pt."""

import sys

import torch

from statten.config import parse_config
from statten.engine.trainer import run_training

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    trainer = run_training(parse_config(argv, "train"))
    torch.save(trainer.model.state_dict(), f"{out}/rank{trainer.ctx.rank}.pt")
