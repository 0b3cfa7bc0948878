"""Run configurations: YAML files with nested keys, overridable as `--set a.b=value`.

The resolved config is saved beside each checkpoint so a run can be repeated exactly.
"""
from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path

import yaml

from lusscore.utils import LusscoreError, atomic_write_text


DEFAULTS = "defaults"  # configs/defaults.yaml: every optional key, under every config


def packaged_configs() -> list[str]:
    """The packaged run configs (not the defaults, not the `luss ablate` rows files)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("lusscore.configs").iterdir()
                  if p.name.endswith(".yaml") and p.name != f"{DEFAULTS}.yaml"
                  and not p.name.startswith("ablations_"))


def with_defaults(cfg: dict) -> dict:
    """cfg over configs/defaults.yaml, section by section: a section's keys are added where
    cfg lacks them (after its own, so a saved config reads in its order); a key's value (a
    mapping included) is never merged into."""
    defaults = _read_config(DEFAULTS)
    merged = copy.deepcopy(cfg)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            for sub, default in value.items():
                merged[key].setdefault(sub, copy.deepcopy(default))
    return merged


def load_config(name_or_path: str | os.PathLike) -> dict:
    """A YAML file, or the name of a packaged config (e.g. 'demo', 'imagenet_s50'), over the
    defaults of every optional key (configs/defaults.yaml)."""
    return with_defaults(_read_config(name_or_path))


def _read_config(name_or_path: str | os.PathLike) -> dict:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named "demo" is no config
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
    else:
        res = resources.files("lusscore.configs").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise LusscoreError(f"no config file or packaged config named {str(name_or_path)!r}; "
                                f"packaged: {', '.join(packaged_configs())}")
        text, path = res.read_text(), Path(str(res))
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LusscoreError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise LusscoreError(f"{path}: a config must be a mapping at the top level")
    return cfg


def parse_value(text: str):
    """`--set` values are YAML scalars or lists: 3, 0.5, true, null, [1, 2], 'text'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Return a copy of cfg with each 'a.b.c=value' applied; unknown keys are an error."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise LusscoreError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise LusscoreError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section "
                                    "of the config")
            node = node[part]
        if parts[-1] not in node:
            known = ", ".join(sorted(node))
            raise LusscoreError(f"--set {key}: unknown key {parts[-1]!r} (known here: {known})")
        node[parts[-1]] = checked_value(key, node[parts[-1]], parse_value(value))
    return cfg


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def checked_value(key: str, current, new):
    """new, if it is of current's kind (an integer for an integer, a number for a number, ...);
    null is always accepted, and so is anything where the config holds null."""
    if new is None or current is None:
        return new
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        sequences = isinstance(current, (list, tuple)) and isinstance(new, (list, tuple))
        ok = type(new) is type(current) or sequences
    elif isinstance(current, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    else:  # a float: an integer is a number too
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
    if not ok:
        raise LusscoreError(f"--set {key}: expected {_kind(current)} (the config has {current!r}), "
                            f"got {new!r}")
    return float(new) if isinstance(current, float) else new


def save_config(path: str | os.PathLike, cfg: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
