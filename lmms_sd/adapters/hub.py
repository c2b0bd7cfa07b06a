"""Model arguments as users pass them: a local folder / file, or a Hugging Face hub id.

``resolve_folder("llava-hf/llava-1.5-7b-hf", revision=None)`` returns the local snapshot folder
(``$HF_HUB_CACHE/models--ORG--NAME/snapshots/<hash>/``): downloaded when online, read from the
cache when ``HF_HUB_OFFLINE=1`` (an error saying "not in the local cache" if it is not there).
``resolve_file("ORG/NAME/sub/table.json")`` does the same for one file of a repo. A revision
is given with ``revision=`` or as ``ORG/NAME@REV``. Paths are tried first: an existing folder
or file is used as is, and a path that looks like one (absolute, ``./``, ``~``) but does not
exist says "no such folder" instead of a hub id error.
"""
from __future__ import annotations

import os
from pathlib import Path

# Weight formats we never read: skipped when a whole repo is downloaded.
IGNORED = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "*.tflite", "original/*"]


def _looks_like_path(source: str) -> bool:
    return (os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source
            or source.count("/") == 0)


def split_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    """``ORG/NAME@REV`` -> (``ORG/NAME``, ``REV``); ``revision`` wins when both are given and
    agree, and two different revisions are an error."""
    repo, at, rev = source.partition("@")
    if not at:
        return source, revision
    if revision is not None and revision != rev:
        raise ValueError(f"{source!r} names revision {rev!r} but revision={revision!r} was given")
    return repo, rev


def _offline_error(repo: str, revision: str | None, what: str) -> FileNotFoundError:
    from huggingface_hub import constants
    return FileNotFoundError(
        f"{what} {repo!r} (revision {revision or 'main'}) is not in the local cache "
        f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: download it first "
        f"(`hf download {repo}`), or pass a local folder")


def _missing_path(source: str, kind: str) -> FileNotFoundError:
    return FileNotFoundError(f"no such {kind}: {source!r} (not a local path; a hub id is "
                             "written ORG/NAME)")


def resolve_folder(source: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the model ``source`` names (see the module docstring)."""
    text = str(source)
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    if Path(text).expanduser().exists():
        raise NotADirectoryError(f"{text!r} is a file; a model argument names a folder or a "
                                 "hub id ORG/NAME")
    repo, revision = split_revision(text, revision)
    if _looks_like_path(repo) or repo.count("/") != 1:
        raise _missing_path(text, "folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=IGNORED))
    except LocalEntryNotFoundError:
        raise _offline_error(repo, revision, "model") from None


def resolve_file(source: str | Path, revision: str | None = None) -> Path:
    """A local file, or ``ORG/NAME/path/in/repo`` (``@REV`` after NAME or at the end)."""
    text = str(source)
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    if _looks_like_path(text) or text.count("/") < 2:
        raise _missing_path(text, "file")
    org, name, filename = text.split("/", 2)
    repo, revision = split_revision(f"{org}/{name}", revision)
    filename, revision = split_revision(filename, revision)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError:
        raise _offline_error(repo, revision, f"file {filename!r} of") from None
