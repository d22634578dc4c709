"""Writing outputs safely: atomic files and folders, output-path checks, locks, stale temporaries.

Atomic writes. A file or folder is written under a temporary name beside its target,
`.NAME.<random>.tmp`, and renamed onto the target only once complete, so a reader never sees a
half-written one. Replacing a file is one rename. Replacing a folder is one atomic exchange of the
two names (Linux renameat2 RENAME_EXCHANGE), after which the old copy is deleted; where the file
system cannot exchange, it takes two renames (target -> `.NAME.old`, temporary -> target), and a kill
between them leaves no target but the old folder at `.NAME.old`: the next atomic_dir on that path,
or `remove_stale_temps`, renames it back before anything else. `atomic_dir` never replaces a folder
that `replaces` does not recognise as the same kind of artifact, nor a file or a link.

Output paths. `check_output_dir` is what every command that writes a folder runs first: never the
current directory or a folder holding it, never into or over an input (the corpus, the data, the
knowledge base read), an existing artifact of the same kind only with `overwrite`, anything else
never.

Locks. `output_lock(path)` serialises writers of one output: a lock file `.NAME.lock` beside it
(flock), removed by its holder on release. A second writer either waits (wait=True) and then finds
the output as the first left it, or fails at once naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that would destroy or mix with something it must not; names the path."""


class OutputBusyError(OutputPathError):
    """Another process is writing the same output."""


# ------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path | str, replaces: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it takes `path`'s place only on success.

    An existing `path` is replaced only if it is an empty folder or `replaces(path)` says it is the
    same kind of artifact (e.g. a knowledge base); anything else is an OutputPathError, before and
    after the work (the check is repeated at the swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    _check_replaceable(path, replaces)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _check_replaceable(path, replaces)
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(path: Path, replaces: Callable[[Path], bool] | None) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a folder; it is left as it is")
    if any(path.iterdir()) and not (replaces is not None and replaces(path)):
        raise OutputPathError(f"{path}: holds files this would replace and did not write; it is left as it is")


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)  # fails (ENOTEMPTY) rather than replace a folder created meanwhile
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = _old_name(path)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)  # a kill before this line: restore_interrupted_swap puts `old` back
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def restore_interrupted_swap(path: Path | str) -> bool:
    """A kill between atomic_dir's two renames left `.NAME.old` and no `path`: put the old folder back."""
    path = Path(path)
    old = _old_name(path)
    if old.is_dir() and not (path.exists() or path.is_symlink()):
        os.rename(old, path)
        return True
    return False


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------- stale temporaries


def stale_temps(path: Path | str) -> list[Path]:
    """What killed writers of `path` left beside it: `.NAME.*.tmp` files and folders (atomic_path,
    atomic_dir), `.NAME.*.stages` (index staging), and `.NAME.old` once `path` is back."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for pattern in (f".{path.name}.*.tmp", f".{path.name}.*.stages") for p in path.parent.glob(pattern)]
    old = _old_name(path)
    if old.exists() and path.exists():
        found.append(old)
    return sorted(found)


def remove_stale_temps_in(folder: Path | str) -> list[Path]:
    """Every `.*.tmp` file or folder directly in `folder`: for a folder whose whole content one writer
    owns (an evaluation's run folder, a build's shard folder), under that writer's lock."""
    folder = Path(folder)
    removed = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


def remove_stale_temps(path: Path | str) -> list[Path]:
    """Remove what killed writers of `path` left (stale_temps), after restoring an interrupted swap.
    Call it only while holding `output_lock(path)`: a live writer's temporary looks the same."""
    restore_interrupted_swap(path)
    removed = stale_temps(path)
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------------------------- locks


def lock_path(path: Path | str) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def output_lock(path: Path | str, wait: bool = True, what: str = "output") -> Iterator[None]:
    """Hold the lock of output `path` (one writer at a time); the lock file is removed on release.

    wait=False: an OutputBusyError naming the holder's pid if another process holds it. A holder
    deletes the lock file before it unlocks, so a waiter that then gets the lock on the deleted file
    tries again on a fresh one (the inode check below)."""
    file = lock_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(file, "a+")  # noqa: SIM115  (kept open for the lock's lifetime)
        try:
            flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
            try:
                fcntl.flock(handle, flags)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise OutputBusyError(f"{path}: another process (pid {holder}) is writing this {what}; "
                                      "wait for it to finish, or choose another output") from None  # fmt: skip
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file while we waited: lock the new one
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                file.unlink(missing_ok=True)
            return
        finally:
            if not handle.closed:
                handle.close()  # closing releases the flock


# -------------------------------------------------------------------------------------- output paths


def check_output_dir(path: Path | str, *, what: str, is_own: Callable[[Path], bool], overwrite: bool = False,
                     inputs: Iterable[Path | str] = (), reuse_own: bool = False) -> bool:  # fmt: skip
    """Refuse an output folder that would destroy or mix with what it must not; True if it holds an
    artifact of this kind that the caller may replace (or, with reuse_own, continue).

    - never the current directory or a folder that holds it;
    - never an input (`inputs`: corpus, data files, the knowledge base read, a checkpoint), a folder
      holding one, or a folder inside one;
    - an existing file or link: never; an empty folder: fine;
    - a folder holding an artifact of this kind (`is_own`): only with `overwrite` (or `reuse_own`);
    - any other folder with files in it: never."""
    path = Path(path)
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"{path}: is the current directory{'' if target == cwd else ' or holds it'}; "
                              f"give a new folder for the {what}")  # fmt: skip
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise OutputPathError(f"{path}: would replace the input {given}; give another folder for the {what}")
        if source.is_dir() and source in target.parents:
            raise OutputPathError(f"{path}: is inside the input folder {given}; give a folder outside it")
    if not (path.exists() or path.is_symlink()):
        return False
    if path.is_symlink() or not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a folder; give a new folder for the {what}")
    if not any(p for p in path.iterdir() if not _is_writer_leftover(p.name)):
        return False
    if not is_own(path):
        raise OutputPathError(f"{path}: holds files that rag did not write as a {what}; they are left as they "
                              "are (give a new or empty folder)")  # fmt: skip
    if not (overwrite or reuse_own):
        raise OutputPathError(f"{path}: already holds a {what}; --overwrite replaces it")
    return True


def _is_writer_leftover(name: str) -> bool:
    """A lock file or temporary of rag's own writers (output_lock, atomic_path, atomic_dir)."""
    return name.startswith(".") and name.endswith((".lock", ".tmp"))


# -------------------------------------------------------------------------------------------- reading


def read_format_json(folder: Path | str, file_name: str, expected_format: str, what: str) -> dict:
    """The JSON file that marks `folder` as a finished `what` (it is written last), checked for its
    "format" field; errors name the file and, for bad JSON, the line."""
    folder = Path(folder)
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {file_name}; not a finished {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); not a {what} file") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; not a {what} file") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: field 'format': expected {expected_format!r}, got {found!r}")
    return data
