"""Module paths as the model defines them, whatever wraps it (DDP, ``torch.compile``)."""

from __future__ import annotations

__all__ = ["WRAPPER_PREFIXES", "clean_module_name"]

# Prefixes that DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) put in
# front of every module path and state_dict key of the model they wrap.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_module_name(name: str) -> str:
    """A module path or state_dict key without DDP / ``torch.compile`` wrapper prefixes."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name
