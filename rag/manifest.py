"""The integrity of a finished folder (a knowledge base): every file's size and SHA-256, checked on open.

    manifest.json     {"format", "files": {relative path: {"size", "sha256"}}[, "nested": [sub-folder]]}:
                      written last, when the folder is complete (and again by whatever adds a part
                      later, e.g. a BM25 index, or changes it, e.g. a live update)
    .verified.json    when the hashes were last found right: each file's (size, mtime, inode, ctime)
                      then, and the manifest's own hash

Opening checks cheaply: every size always (a stat per file), and the hashes only when a file's
(size, mtime, inode, ctime) differ from the last verification: so the first open after a build, a
copy, or any change to a file (ctime moves with every write and cannot be set back) hashes, and
later opens do not. `verify_folder(full=True)` (rag index verify) hashes everything regardless.
A file that is missing, of another size or another hash is an IntegrityError naming it: a swapped or
edited file never gives answers. Hidden files (locks, temporaries, the stamp) are not part of it.
"nested" sub-folders (a sharded knowledge base's shards) have manifests of their own, checked when
each is opened (by the process or Ray actor serving it): the folder's manifest covers only their
manifest.json, so a shard swapped for another is still caught, and hashing a shard is never repeated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag.io import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
STAMP_FILE = ".verified.json"
FORMAT = "rag-manifest"
_CHUNK = 8 << 20


class IntegrityError(ValueError):
    """A file of a folder differs from its manifest (or the manifest is unreadable); names the files."""


@dataclass(frozen=True)
class Verification:
    folder: Path
    files: int
    bytes: int
    hashed: bool  # False: sizes checked, hashes taken as verified by the stamp
    legacy: bool  # no manifest (built before manifests): nothing was checked


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _members(folder: Path, nested: tuple[str, ...] = ()) -> list[Path]:
    """The files a manifest covers: every regular file under `folder`, except hidden ones and itself,
    and of a `nested` sub-folder only its own manifest."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == MANIFEST_FILE:
            continue
        if rel.parts[0] in nested and rel.as_posix() != f"{rel.parts[0]}/{MANIFEST_FILE}":
            continue
        if path.is_file():
            out.append(path)
    return out


def write_manifest(folder: Path | str, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """Hash every file of `folder` into its manifest.json (atomically, last), and stamp it verified.
    nested: sub-folders that hold manifests of their own (written before this one): only those are covered."""
    folder = Path(folder)
    for sub in nested:
        if read_manifest(folder / sub) is None:
            raise IntegrityError(f"{folder / sub}: a nested folder needs its own {MANIFEST_FILE} first")
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _members(folder, nested)}  # fmt: skip
    manifest: dict[str, Any] = {"format": FORMAT, "version": 1, "files": files}
    if nested:
        manifest["nested"] = list(nested)
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    _write_stamp(folder, files)
    return manifest


def update_manifest(folder: Path | str, parts: list[str]) -> None:
    """Re-hash `parts` (files or sub-folders, relative) into an existing manifest: a part added to a
    finished folder later (a BM25 index, hybrid.json). A folder without a manifest stays without one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return

    def updated(name: str) -> bool:
        return any(name == p or name.startswith(p.rstrip("/") + "/") for p in parts)

    stamp = _read_json(folder / STAMP_FILE)
    valid = isinstance(stamp, dict) and stamp.get("manifest") == _manifest_hash(folder)
    seen = {k: v for k, v in stamp["files"].items() if not updated(k)} if valid and isinstance(stamp.get("files"), dict) else {}
    files = {name: entry for name, entry in manifest["files"].items() if not updated(name)}
    for path in _members(folder, tuple(manifest.get("nested", ()))):
        rel = path.relative_to(folder).as_posix()
        if updated(rel):
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            seen[rel] = _stat_key(path)
    atomic_write_text(folder / MANIFEST_FILE, json.dumps({**manifest, "files": files}, indent=2, sort_keys=True))
    _save_stamp(folder, {k: v for k, v in seen.items() if k in files})


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    """The folder's manifest, None if it has none; an IntegrityError if it is not one."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    data = _read_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    nested = data.get("nested", []) if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()) or not isinstance(nested, list) or not all(
            isinstance(n, str) and n and "/" not in n and not n.startswith(".") for n in nested)):  # fmt: skip
        raise IntegrityError(f"{path}: not a manifest this version wrote (format {FORMAT!r}, files with size "
                             "and sha256, nested sub-folder names)")  # fmt: skip
    return data


def verify_folder(folder: Path | str, full: bool = False, optional: tuple[str, ...] = ()) -> Verification:
    """Check `folder` against its manifest: sizes always, hashes if `full` or the stamp is stale.
    `optional`: parts (files or sub-folders) that may be absent as a whole (a derived part that is
    rebuilt when missing, e.g. a BM25 index); a part present in part is an error like any other.
    full: the nested sub-folders too, each against its own manifest (otherwise whoever opens one does)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        log.warning("%s: no %s (built before manifests): its files are not verified; `rag index verify "
                    "--write-manifest` records them as they are now", folder, MANIFEST_FILE)  # fmt: skip
        return Verification(folder, 0, 0, False, True)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for part in optional:
        members = [n for n in files if n == part or n.startswith(part.rstrip("/") + "/")]
        if members and not any((folder / n).exists() for n in members):
            files = {n: e for n, e in files.items() if n not in members}
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest records {entry['size']}")
    _raise(folder, problems)
    total = sum(e["size"] for e in files.values())
    if not full and _stamp_matches(folder, files):
        return Verification(folder, len(files), total, False, False)
    for name, entry in files.items():
        if sha256_file(folder / name) != entry["sha256"]:
            problems.append(f"{folder / name}: content differs from the manifest (SHA-256)")
    _raise(folder, problems)
    _write_stamp(folder, files)
    count = len(files)
    for sub in manifest.get("nested", []) if full else []:
        inner = verify_folder(folder / sub, full=True, optional=optional)
        count, total = count + inner.files, total + inner.bytes
    return Verification(folder, count, total, True, False)


def _raise(folder: Path, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IntegrityError(f"{folder}: files changed or swapped after it was written: {shown}. It is not "
                             "used (rebuild it; `rag index verify` lists every file)")  # fmt: skip


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _manifest_hash(folder: Path) -> str:
    return sha256_file(folder / MANIFEST_FILE)


def _stamp_matches(folder: Path, files: dict[str, Any]) -> bool:
    stamp = _read_json(folder / STAMP_FILE)
    if not isinstance(stamp, dict) or stamp.get("manifest") != _manifest_hash(folder):
        return False
    seen = stamp.get("files")
    return isinstance(seen, dict) and all(seen.get(name) == _stat_key(folder / name) for name in files)


def _write_stamp(folder: Path, files: dict[str, Any]) -> None:
    _save_stamp(folder, {name: _stat_key(folder / name) for name in files})


def _save_stamp(folder: Path, seen: dict[str, Any]) -> None:
    """Best effort: a read-only folder is verified again at its next open."""
    try:
        atomic_write_text(folder / STAMP_FILE, json.dumps({"manifest": _manifest_hash(folder), "files": seen}))
    except OSError:
        pass


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        if path.name == STAMP_FILE:
            return None  # a broken stamp only means: hash again
        raise IntegrityError(f"{path}: unreadable ({error})") from None
