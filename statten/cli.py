"""The ``statten`` command and its subcommands (``statten train``, ``statten test``, ...).

Errors a user can fix (bad configuration, missing data, unusable checkpoint, diverging training)
print one line and exit with status 2; ``--debug`` shows the traceback instead. SIGTERM or SIGINT
during training writes a recovery checkpoint, prints one line naming it and exits with 143 / 130.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from statten.checkpoint import CheckpointError
from statten.config import ConfigError, resolve_config
from statten.data import DatasetNotFoundError
from statten.engine.stopping import TrainingStopped
from statten.engine.trainer import TrainingError

USER_ERRORS = (ConfigError, CheckpointError, DatasetNotFoundError, TrainingError)


def _train(argv: Sequence[str]) -> Any:
    from statten.engine.trainer import train

    return train(resolve_config(argv, "train"))


def _test(argv: Sequence[str]) -> Any:
    from statten.engine.tester import test
    from statten.engine.trainer import dry_run

    cfg = resolve_config(argv, "test")
    return dry_run(cfg) if cfg.dry_run else test(cfg)


# Subcommand -> handler taking the remaining arguments; "module:function" strings load lazily.
HANDLERS: dict[str, Callable[[Sequence[str]], Any] | str] = {
    "train": _train,
    "test": _test,
    "data": "statten.data.prepare:main",
    "profile": "statten.engine.profiler:main",
    "bench": "statten.bench:main",
}
USAGE = (
    f"usage: statten {{{','.join(HANDLERS)}}} [options]   (statten COMMAND --help for the options)"
)


def _handler(command: str) -> Callable[[Sequence[str]], Any]:
    handler = HANDLERS[command]
    if callable(handler):
        return handler
    module, function = handler.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in HANDLERS:
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        _handler(command)(rest)
    except USER_ERRORS as err:
        if "--debug" in rest:
            raise
        print(f"statten {command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:  # SIGTERM / SIGINT during training
        if stop.primary:
            print(f"statten {command}: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"statten {command}: interrupted", file=sys.stderr)
        return 130
    return 0


def entry_point() -> None:
    """Console-script entry (``statten``)."""
    raise SystemExit(main())


__all__ = ["main"]
