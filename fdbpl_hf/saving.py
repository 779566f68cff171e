"""Saving into a folder the user names: fdbpl_hf writes, replaces or removes only its own files.

`save_files` has the caller write every file of a save into a staging folder inside the target.
Then each staged file whose name the target already holds is checked: it is replaced only when
fdbpl_hf recognisably wrote it (the caller's `owner` rule decides, by content). Any other file
makes the save refuse, naming it and why, and the target keeps what it held. A `README.md` that
fdbpl_hf did not write is kept as it is (peft keeps a user's card too), with a warning. Then the
staged files are moved in, one rename each (every file is whole: old or new), with the mode the
user's umask gives, and the caller's stale files of its own (a superseded format) are removed.

Cards fdbpl_hf writes end with a stamp, `<!-- fdbpl_hf card <digest>: ... -->`, the digest of
the card above it. A card whose stamp matches is ours and is refreshed by the next save
(checkpoints save again and again); a card edited since (its digest no longer matches) is the
user's and is kept. Cards written before 0.7 have no stamp: they are recognised by their heading
and their `fdbpl` tag (edits made to such a card cannot be told apart, and are replaced).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import warnings
from typing import Callable, Iterable, Optional, Sequence

from .files import atomic_write, file_mode, fsync_dir, fsync_file, pid_alive

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
STAGING_PREFIX = ".fdbpl_hf-saving-"
_STAMP = re.compile(r"\n<!-- fdbpl_hf card ([0-9a-f]{16}):[^\n]*-->\n*\Z")

# (file name, path of the existing file) -> None when fdbpl_hf wrote it, else why it is not ours
Owner = Callable[[str, str], Optional[str]]


def resolve_folder(path: str | os.PathLike) -> str:
    """`path` with `~` expanded and symbolic links resolved (a link to a missing folder gives the
    folder it names, which the save creates); a path that is a file is refused."""
    folder = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{os.fspath(path)} is a file, not a folder: give a folder to save into")
    return folder


def _card_digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def stamp_card(text: str) -> str:
    """A card's text with fdbpl_hf's stamp appended (see the module docstring)."""
    body = text if text.endswith("\n") else text + "\n"
    return (body + f"\n<!-- fdbpl_hf card {_card_digest(body)}: written by fdbpl_hf, rewritten by its next save "
            "while unchanged; edit it and it is kept -->\n")


def strip_card_stamp(text: str) -> str:
    """A card's text without fdbpl_hf's stamp (the card as it was before `stamp_card`)."""
    match = _STAMP.search(text)
    return text[: match.start()] if match else text


def save_card_file(path: str | os.PathLike, text: str, headings: Sequence[str]) -> str:
    """Write an edited card back to `path` (e.g. with evaluation results added): still fdbpl_hf's,
    stamped again, when the card there was fdbpl_hf's; the user's, as given, otherwise."""
    path = os.fspath(path)
    ours = os.path.isfile(path) and card_owner(path, headings) is None
    return atomic_write(path, stamp_card(strip_card_stamp(text)) if ours else text)


def card_owner(path: str, headings: Sequence[str]) -> Optional[str]:
    """None when the card at `path` is fdbpl_hf's and unchanged since (its stamp matches, or a card
    of before 0.7: one of `headings` and the `fdbpl` tag), else why it is the user's."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return "a file fdbpl_hf cannot read as a card"
    match = _STAMP.search(text)
    if match:
        if _card_digest(text[: match.start()]) == match.group(1):
            return None
        return "a card written by fdbpl_hf and edited since"
    body = text.split("\n---\n", 1)[1] if text.startswith("---\n") and "\n---\n" in text else text
    first = next((line.strip() for line in body.splitlines() if line.strip()), "")
    header = text.split("\n---\n", 1)[0] if text.startswith("---\n") else ""
    if any(first.startswith(h) for h in headings) and re.search(r"^- fdbpl$", header, re.M):
        return None
    return "a card fdbpl_hf did not write"


def conflicts(folder: str, names: Iterable[str], owner: Owner) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """((name, why) of the files of `names` in `folder` that a save may not replace, (name, why)
    of a user's card there, which the save keeps)."""
    refused, kept = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path):
            why = "a symbolic link"
        elif os.path.isdir(path):
            why = "a folder"
        else:
            why = owner(name, path)
        if why is not None:
            (kept if name == CARD_NAME and not os.path.isdir(path) else refused).append((name, why))
    return refused, kept


def refuse_conflicts(folder: str | os.PathLike, names: Iterable[str], owner: Owner, what: str) -> None:
    """Raise a `ValueError` when saving `what` into `folder` would replace a file fdbpl_hf did not
    write (checked before a long job that ends with that save, e.g. training)."""
    folder = resolve_folder(folder)
    if not os.path.isdir(folder):
        return
    refused, _ = conflicts(folder, names, owner)
    if refused:
        raise ValueError(_refusal(folder, refused, what))


def _refusal(folder: str, refused: list[tuple[str, str]], what: str) -> str:
    listed = "; ".join(f"{name} ({why})" for name, why in refused)
    return (f"{folder} holds files that fdbpl_hf did not write and that saving {what} would replace: "
            f"{listed}. Nothing was changed in it: save into a new or empty folder (a model's folder "
            "is not an adapter's), or move those files away.")


def warn_card_kept(path: str, why: str, what: str) -> None:
    warnings.warn(f"kept {path}: it is {why}, so {what}'s card was not written over it (delete it, or save into "
                  "another folder, to get fdbpl_hf's card)", UserWarning, stacklevel=3)


def write_card(folder: str | os.PathLike, text: str, headings: Sequence[str], what: str) -> Optional[str]:
    """Write a card (stamped) as `folder/README.md` unless the README there is the user's (then it
    is kept, with a warning); returns the path written, or None."""
    path = os.path.join(resolve_folder(folder), CARD_NAME)
    if os.path.lexists(path):
        why = "a symbolic link" if os.path.islink(path) else card_owner(path, headings)
        if why is not None:
            warn_card_kept(path, why, what)
            return None
    return atomic_write(path, stamp_card(text))


def remove_dead_staging(folder: str) -> None:
    """Remove the staging folders that saves killed on this host left in `folder` (named by our
    prefix, host and pid; their process is gone): a later push would upload them."""
    host = socket.gethostname()
    for name in os.listdir(folder):
        if not name.startswith(f"{STAGING_PREFIX}{host}-"):
            continue
        pid = name[len(STAGING_PREFIX) + len(host) + 1:].split("-", 1)[0]
        path = os.path.join(folder, name)
        if pid.isdigit() and not pid_alive(int(pid)) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by a save that was killed", path)


def save_files(folder: str | os.PathLike, write: Callable[[str], None], owner: Owner, *, what: str,
               stale: Optional[Callable[[str], list[str]]] = None, last: Sequence[str] = ()) -> str:
    """Save `what` into `folder` by the rules of the module docstring; returns the folder.

    `write(staging)` writes every file of the save into the (empty) staging folder; `owner` says
    which existing files may be replaced; `stale(folder)` names files of fdbpl_hf's own that this
    save supersedes (removed after it); `last`: names moved in last (the files that say a folder
    holds a complete save)."""
    folder = resolve_folder(folder)
    os.makedirs(folder, exist_ok=True)
    remove_dead_staging(folder)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=folder)
    try:
        write(staging)
        names = sorted(os.listdir(staging), key=lambda n: (n in last, last.index(n) if n in last else 0, n))
        nested = [n for n in names if os.path.isdir(os.path.join(staging, n))]
        if nested:
            raise RuntimeError(f"saving {what} wrote folders {nested}, which fdbpl_hf does not expect")
        refused, kept = conflicts(folder, names, owner)
        if refused:
            raise ValueError(_refusal(folder, refused, what))
        superseded = [n for n in (stale(folder) if stale else []) if n not in names]
        keep = {name for name, _ in kept}
        mode = file_mode()
        for name in names:
            if name in keep:
                continue
            src = os.path.join(staging, name)
            os.chmod(src, mode)  # safetensors writes 0600; the folder's other files follow the umask
            fsync_file(src)
            os.replace(src, os.path.join(folder, name))
        for name in superseded:
            os.remove(os.path.join(folder, name))
            logger.info("removed %s: fdbpl_hf's own file of an older format, superseded by this save",
                        os.path.join(folder, name))
        fsync_dir(folder)
        for name, why in kept:
            warn_card_kept(os.path.join(folder, name), why, what)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
