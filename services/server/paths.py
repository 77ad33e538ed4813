"""Client-supplied paths on the server's disk: resolved inside allowed roots, containment before existence.

Every RPC that takes a path (datasets, training data, adapters, model directories) goes through `resolve_within`,
so the rules are the same everywhere:
- a relative path is taken relative to the first root, never to the server's working directory (nor to a home
  directory: a leading `~` is a name like any other);
- `..` is resolved on paper first, and that spelling must lie inside one of the roots, so no component outside
  the roots is ever looked up (whether one is a symlink changes no answer); then symlinks are resolved, and the
  result must lie inside one of the roots too;
- only then is existence checked, so the answer for a path outside the roots is the same whether or not it
  exists (no oracle for the rest of the disk);
- OS errors (a name too long, a NUL byte, a loop of links) are the client's: INVALID_ARGUMENT, never INTERNAL;
- messages quote at most a short prefix of what the client sent and never name a root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from genloom.services.server.errors import InvalidArgument, NotFound, PermissionDenied, quote

# Longer than any path a file system accepts (PATH_MAX is 4096 on Linux): refused before touching the disk.
MAX_PATH_LENGTH = 4096

Kind = Literal["file", "dir", "any"]


def canonical(path: str | os.PathLike[str]) -> Path:
    """The absolute path with `~`, `.`, `..` and symlinks resolved (existing or not): the one spelling of a
    place, for containment checks and cache keys."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def on_paper(path: str | os.PathLike[str]) -> Path:
    """An operator's spelling of a place made absolute, with `~`, `.` and `..` resolved as text (no file system
    look-up: symlinks stay as spelled)."""
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def resolve_within(
    path: str,
    roots: Sequence[str | os.PathLike[str]],
    *,
    field: str,
    kind: Kind = "file",
    setting: str = "",
) -> Path:
    """The canonical path `path` names, provided it lies inside one of `roots` and exists as `kind`.

    Raises InvalidArgument (empty, malformed, wrong kind), PermissionDenied (no roots configured, or outside
    them, existing or not) or NotFound (inside a root but absent). `setting` names the setting that lists the
    roots, for the message that says how to allow a path.
    """
    if not path or not path.strip():
        raise InvalidArgument.field(field, "must not be empty")
    if "\x00" in path:
        raise InvalidArgument.field(field, "must not contain a NUL character")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidArgument.field(field, f"is {len(path)} characters long; the limit is {MAX_PATH_LENGTH}")
    if not roots:
        hint = f": set {setting}" if setting else ""
        raise PermissionDenied(f"{field}: paths on the server are not allowed here{hint}")
    bases = [canonical(root) for root in roots]
    # A root may be configured through a symlink: its own spelling counts as inside as well as its target.
    spelled = [*bases, *(on_paper(root) for root in roots)]
    try:
        # The client's "~" is a plain name, never expanded: "~user" would look up the server's accounts (an
        # oracle for which users exist) and is nothing a client can know about anyway.
        candidate = Path(path)
        lexical = Path(os.path.normpath(candidate if candidate.is_absolute() else bases[0] / candidate))
        # Only a spelling inside a root reaches the disk: realpath of "outside/../root/x" would look up "outside"
        # and answer differently when it is a symlink.
        inside = _within(lexical, spelled)
        resolved = Path(os.path.realpath(lexical)) if inside else lexical
    except (OSError, ValueError, RuntimeError) as err:
        raise InvalidArgument.field(field, f"{quote(path)} is not a usable path: {_reason(err)}") from None
    if not inside or not _within(resolved, bases):
        where = f" ({setting})" if setting else ""
        raise PermissionDenied(f"{field}: {quote(path)} is outside the directories this server allows{where}")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise NotFound(f"{field}: {quote(path)} does not exist") from None
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ENOENT):
            raise NotFound(f"{field}: {quote(path)} does not exist") from None
        raise InvalidArgument.field(field, f"{quote(path)} cannot be opened: {_reason(err)}") from None
    if kind == "file" and stat.S_ISDIR(mode):
        raise InvalidArgument.field(field, f"{quote(path)} is a directory, not a file")
    if kind == "file" and not stat.S_ISREG(mode):
        raise InvalidArgument.field(field, f"{quote(path)} is not a regular file")
    if kind == "dir" and not stat.S_ISDIR(mode):
        raise InvalidArgument.field(field, f"{quote(path)} is not a directory")
    return resolved


def _within(path: Path, bases: Sequence[Path]) -> bool:
    return any(path == base or path.is_relative_to(base) for base in bases)


def _reason(err: BaseException) -> str:
    # strerror, never str(err): the latter repeats the absolute path, i.e. where the roots are.
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return type(err).__name__
