"""One switch for every op wrapper: the fused kernels (default) or the pure-PyTorch references.

The pipeline calls the custom ops only through the lusscore.ops wrappers. Each wrapper asks
`reference_enabled()` and, when the switch is on, runs its twin from lusscore.reference instead
of the torch.ops.lusscore kernel (same checks, same output dtypes and layout). The references
are the baseline of bench/bench_pipeline.py: same results up to rounding, their own speed and
memory. munkres_assign (a host-side exact port of Munkres, not a kernel) always runs.

    lusscore.ops.use_reference(True)     # from now on (like torch.set_grad_enabled)
    with lusscore.ops.use_reference():   # inside the block only
    ops: reference                       # the config key (default fused), `--set ops=reference`

Stage functions decorated with `ops_from_config` run with their config's `ops` mode and
restore the previous mode afterwards; the stage commands apply it for their whole process.
"""
from __future__ import annotations

import functools

from lusscore.utils import LusscoreError

MODES = ("fused", "reference")
CONFIG_KEY = "ops"

_reference = False


def reference_enabled() -> bool:
    """True when the op wrappers run the pure-PyTorch references."""
    return _reference


def ops_mode() -> str:
    return "reference" if _reference else "fused"


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise LusscoreError(f"ops must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def set_ops_mode(mode: str) -> None:
    """'fused' (the custom kernels) or 'reference' (lusscore.reference) for every op wrapper."""
    global _reference
    _reference = _check_mode(mode) == "reference"


class use_reference:
    """Switch the op wrappers to the references (or back, with False).

    Takes effect at once; as a context manager it restores the previous mode on exit.
    """

    def __init__(self, enabled: bool = True):
        self.previous = ops_mode()
        set_ops_mode("reference" if enabled else "fused")

    def __enter__(self) -> use_reference:
        return self

    def __exit__(self, *exc) -> None:
        set_ops_mode(self.previous)


def config_ops_mode(cfg: dict) -> str:
    """The config's `ops` mode; the mode in force when the config has no such key."""
    mode = cfg.get(CONFIG_KEY)
    return ops_mode() if mode is None else _check_mode(mode)


def apply_ops_config(cfg: dict) -> str:
    """Set the process-wide mode from the config (a stage command's start); returns it."""
    mode = config_ops_mode(cfg)
    set_ops_mode(mode)
    return mode


def ops_from_config(fn):
    """Decorator for a stage function whose first argument is the run config or a stage
    context holding it (`.cfg`): it runs in the config's `ops` mode, and the previous mode is
    restored when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        cfg = getattr(first, "cfg", first)
        with use_reference(config_ops_mode(cfg) == "reference"):
            return fn(first, *args, **kwargs)
    return wrapper
