"""Small helpers shared by every part of lusscore: atomic writes, errors, progress bars."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator


class LusscoreError(ValueError):
    """A problem with user input (a file, a shape, a setting), said in words."""


# mkstemp creates files as 0600; finished files get the usual mode (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


# atomic_path's temporaries: .<name>.<random>.tmp<suffix> (the suffix kept: PIL and NumPy
# choose the format by it). A kill before the rename leaves one; readers skip them and
# resumers remove them (remove_temp_files).
_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp(\.[^.]+)?$")


def is_temp_file(path: str | os.PathLike) -> bool:
    return _TEMP_NAME.match(Path(path).name) is not None


def files_under(folder: str | os.PathLike, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """The regular files below folder whose suffix (any case) is one of suffixes, without
    atomic_path's temporaries."""
    return (p for p in Path(folder).rglob("*")
            if p.suffix.lower() in suffixes and not is_temp_file(p) and p.is_file())


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporaries a killed writer left below folder; returns how many."""
    stale = [p for p in Path(folder).rglob(".*.tmp*") if is_temp_file(p) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return len(stale)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    A crash or exception leaves `path` untouched (old content or absent), never half-written.
    A symlink keeps pointing where it did (its target is written), an existing file keeps
    its mode, and what is not a regular file (/dev/stdout, a FIFO) is written through.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        yield path  # nothing to rename over: a device or a pipe takes the bytes as they come
        return
    mode = path.stat().st_mode & 0o7777 if path.is_file() else _FILE_MODE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, mode)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class _LogLines:
    """Where progress bars write when stderr is not a terminal (a log file, CI): every
    refresh becomes one plain line instead of a carriage-return redraw."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


LOG_INTERVAL_S = 30  # a redirected bar writes at most one line per bar this often


def progress_bar(iterable=None, **kwargs):
    """tqdm on a terminal; on a redirected stderr, one plain line per LOG_INTERVAL_S (postfix
    updates included) and one with the final state, so logs stay readable. TQDM_DISABLE=1
    turns every bar off."""
    from tqdm import tqdm

    class LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **values):
            super().set_postfix(ordered_dict, refresh=False, **values)  # the interval decides

        def close(self):
            if not self.disable and self.n:
                self.refresh()  # the final state, as one line
                self.leave = False  # printed: tqdm's own last frame would repeat it
            super().close()

    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        kwargs["disable"] = True
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("file", _LogLines())
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("delay", LOG_INTERVAL_S)  # no "0%" line for what ends sooner
    kwargs.setdefault("ncols", 100)
    return LogBar(iterable, **kwargs)
