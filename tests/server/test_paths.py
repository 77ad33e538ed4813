"""services/server/paths.py: client paths resolved inside allowed roots, containment before existence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genloom.services.server.errors import InvalidArgument, NotFound, PermissionDenied, ServiceError, quote
from genloom.services.server.paths import MAX_PATH_LENGTH, canonical, resolve_within

SETTING = "GENLOOM_TEST_ROOTS"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root holding a file and a directory, next to a secret file and directory outside it."""
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "data.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "secret-dir").mkdir()
    return tmp_path / "root"


def resolve(path: str, *roots: Path, kind: str = "any") -> Path:
    return resolve_within(path, list(roots), field="path", kind=kind, setting=SETTING)  # type: ignore[arg-type]


def refusal(path: str, *roots: Path, kind: str = "any") -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        resolve(path, *roots, kind=kind)
    return caught.value


def test_relative_paths_resolve_against_the_first_root_not_the_working_directory(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # secret.txt is in the working directory, not in the root
    assert resolve("data.txt", root) == root / "data.txt"
    assert resolve("sub/../data.txt", root) == root / "data.txt"
    assert isinstance(refusal("secret.txt", root), NotFound)


def test_every_spelling_of_a_place_is_one_canonical_path(root: Path) -> None:
    spellings = ["data.txt", "./data.txt", "././data.txt", "sub/../data.txt", f"{root}/./sub/../data.txt"]
    assert {resolve(s, root) for s in spellings} == {root / "data.txt"}
    assert canonical(f"{root}/./././sub/..") == canonical(root) == root


@pytest.mark.parametrize("outside", ["../secret.txt", "../secret-dir", "/etc/passwd", "sub/../../secret.txt"])
def test_outside_the_roots_is_denied_the_same_whether_or_not_it_exists(root: Path, outside: str) -> None:
    missing = outside.replace("secret", "absent").replace("passwd", "no-such-file")
    for path in (outside, missing):
        err = refusal(path, root)
        assert isinstance(err, PermissionDenied)
        assert err.message == f"path: {quote(path)} is outside the directories this server allows ({SETTING})"


def test_symlinks_are_resolved_before_the_containment_check(root: Path) -> None:
    os.symlink(root.parent / "secret.txt", root / "escape.txt")
    os.symlink(root.parent, root / "up")
    os.symlink(root / "data.txt", root / "alias.txt")
    for path in ("escape.txt", "up/secret.txt", "up/absent.txt"):
        assert isinstance(refusal(path, root), PermissionDenied)
    assert resolve("alias.txt", root) == root / "data.txt"
    os.symlink(root, root.parent / "root-link")  # a root that is itself a link
    assert resolve("data.txt", root.parent / "root-link") == root / "data.txt"


def test_whether_a_component_outside_the_roots_is_a_symlink_changes_no_answer(root: Path, tmp_path: Path) -> None:
    # Review finding 13: only the symlink-resolved path was checked, so "outside/../root/x" was looked up through
    # "outside": inside when it is a directory, outside when it is a link elsewhere (or back into the root).
    (tmp_path / "plain").mkdir()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "er", tmp_path / "away")  # points elsewhere outside the root
    os.symlink(root / "sub", tmp_path / "into")  # points into the root
    for component in ("plain", "away", "into", "absent"):
        # Inside the root on paper: the outside component is never looked up.
        assert resolve(f"{tmp_path}/{component}/../root/data.txt", root) == root / "data.txt", component
        # Outside on paper: refused before anything is looked up, link into the root or not.
        for path in (f"{tmp_path}/{component}/../data.txt", f"../{component}/../data.txt", f"../{component}/x"):
            err = refusal(path, root)
            assert isinstance(err, PermissionDenied), path
            assert err.message == f"path: {quote(path)} is outside the directories this server allows ({SETTING})"


def test_a_root_configured_through_a_symlink_accepts_either_spelling(root: Path, tmp_path: Path) -> None:
    os.symlink(root, tmp_path / "root-link")
    for path in (f"{tmp_path}/root-link/data.txt", f"{root}/data.txt", "data.txt"):
        assert resolve(path, tmp_path / "root-link") == root / "data.txt", path


def test_any_of_several_roots_contains(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "secret-dir"
    (other / "x.txt").write_text("x")
    assert resolve(str(other / "x.txt"), root, other) == other / "x.txt"
    assert isinstance(refusal(str(tmp_path / "secret.txt"), root, other), PermissionDenied)


def test_a_tilde_is_a_name_not_a_home_directory(root: Path) -> None:
    # Expanding it would answer differently for an account that exists (its home: outside, PERMISSION_DENIED)
    # and one that does not (a name in the root, NOT_FOUND): an oracle for the server's accounts.
    for path in ("~root/x", "~/x", "~no-such-user-here/x"):
        assert isinstance(refusal(path, root), NotFound), path
    (root / "~").mkdir()
    (root / "~" / "x").write_text("a file named x in a directory named ~")
    assert resolve("~/x", root) == root / "~" / "x"


def test_inside_the_root_missing_is_not_found(root: Path) -> None:
    for path in ("absent.txt", "data.txt/below", "sub/absent/deeper"):
        err = refusal(path, root)
        assert isinstance(err, NotFound), path
        assert err.message == f"path: {quote(path)} does not exist"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("a\0b", "must not contain a NUL character"),
        ("a" * 300, f"{quote('a' * 300)} cannot be opened: File name too long"),
        ("sub/" + "b" * 256 + "/c", "cannot be opened: File name too long"),
        (
            "x/" * (MAX_PATH_LENGTH // 2 + 1),
            f"is {MAX_PATH_LENGTH + 2} characters long; the limit is {MAX_PATH_LENGTH}",
        ),
    ],
)
def test_unusable_paths_are_invalid_arguments_never_os_errors(root: Path, path: str, problem: str) -> None:
    err = refusal(path, root)
    assert isinstance(err, InvalidArgument)
    assert err.violations[0].field == "path"
    assert problem in err.message
    assert str(root) not in err.message  # the root's location is not shown
    assert len(err.message) < 300  # a short quote, never the whole input


def test_over_long_absolute_path_outside_the_roots_is_denied(root: Path) -> None:
    # Containment first: nothing is looked up for a path outside the roots, however long its names.
    err = refusal("/" + "a" * 300, root)
    assert isinstance(err, PermissionDenied) and len(err.message) < 300


def test_a_loop_of_links_is_invalid(root: Path) -> None:
    os.symlink(root / "loop", root / "loop")
    err = refusal("loop/x", root)
    assert isinstance(err, InvalidArgument)
    assert "symbolic links" in err.message and str(root) not in err.message


def test_kind_is_checked_after_existence(root: Path) -> None:
    assert resolve("sub", root, kind="dir") == root / "sub"
    assert resolve("data.txt", root, kind="file") == root / "data.txt"
    assert resolve(".", root, kind="dir") == root
    err = refusal("sub", root, kind="file")
    assert isinstance(err, InvalidArgument) and err.message == "path: 'sub' is a directory, not a file"
    err = refusal("data.txt", root, kind="dir")
    assert isinstance(err, InvalidArgument) and err.message == "path: 'data.txt' is not a directory"


def test_no_roots_means_no_paths(root: Path) -> None:
    for path in ("data.txt", str(root / "data.txt"), "absent"):
        err = refusal(path)
        assert isinstance(err, PermissionDenied)
        assert err.message == f"path: paths on the server are not allowed here: set {SETTING}"
