"""Every path-like field of every RPC (`path`, `model`, `base_model`, anywhere in a request) with ways out of its
root: absolute paths, `..`, symlinks inside a root that point outside it (to a file, a directory, a real model, the
fine-tuning artifact store), a symlink loop, and names over the OS limit.

Properties, besides those of every call (harness.py):
- nothing outside a root is ever served (never OK);
- no existence oracle: a path outside the roots gets the same status code whether or not it exists.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from .harness import (
    SERVICES,
    STATS,
    ExistenceOracle,
    FuzzSession,
    ReadOutsideRoot,
    assert_still_serving,
    check_all,
    dotted,
    with_field,
)
from .strategies import field_paths
from .test_every_field import base_request

PATH_NAMES = frozenset({"path", "model", "base_model"})
# Filters compared with stored names, never opened: any value is fine there.
FILTERS = frozenset({"genloom.v1.ListJobsRequest.base_model", "genloom.v1.ListAdaptersRequest.base_model"})


def _is_path(fd: FD) -> bool:
    return fd.name in PATH_NAMES and fd.type == FD.TYPE_STRING and fd.full_name not in FILTERS


RPCS = [
    f"{service}.{m.name}"
    for service, (desc, _) in SERVICES.items()
    for m in desc.methods
    if any(_is_path(p[-1]) for p in field_paths(m.input_type))
]


def _escapes(s: FuzzSession) -> list[tuple[str, str]]:
    """(existing, missing) pairs of paths outside every root, spelled the ways a client could."""
    job_data = s.artifacts / "jobs" / s.job_ids[0] / "data"
    existing_artifact = next((str(p) for p in job_data.glob("*") if p.is_file()), str(job_data / "training.jsonl"))
    return [
        ("/etc/passwd", "/etc/no-such-genloom-file"),
        (str(s.outside / "secret.jsonl"), str(s.outside / "missing.jsonl")),
        ("../outside/secret.jsonl", "../outside/missing.jsonl"),
        ("../../outside/lora", "../../outside/no-lora"),
        ("links/secret.jsonl", "links/dangling"),
        ("links/outside/train.jsonl", "links/outside/missing.jsonl"),
        ("links/outside/lora", "links/outside/no-lora"),
        ("links/etc/passwd", "links/etc/no-such-genloom-file"),
        (f"{s.models_root}/links/default-model/smollm2-135m-instruct", f"{s.models_root}/links/default-model/nope"),
        (existing_artifact, str(job_data / "missing.jsonl")),
        (f"links/artifacts/jobs/{s.job_ids[0]}/data/training.jsonl", "links/artifacts/jobs/x/data/training.jsonl"),
    ]


ODD_PATHS = ("/" + "a" * 300, "a" * 300, "/" + "a" * 300 + "/b", "x/" * 2000, "links/loop", "\x00", "~/x", "..")


@pytest.mark.parametrize("rpc", RPCS)
def test_paths_stay_inside_their_roots(fuzz: FuzzSession, rpc: str) -> None:
    base = base_request(fuzz, rpc)
    paths = [p for p in field_paths(base.DESCRIPTOR) if _is_path(p[-1])]
    failures = check_all(
        fuzz, [(rpc, f"{dotted(p)}={v[:40]!r}", with_field(base, p, v)) for p in paths for v in ODD_PATHS]
    )
    for path in paths:
        for existing, missing in _escapes(fuzz):
            request = with_field(base, path, existing)
            seen = fuzz.target.invoke(rpc, request)
            unseen = fuzz.target.invoke(rpc, with_field(base, path, missing))
            label = f"{dotted(path)}={existing!r}"
            if seen.code == grpc.StatusCode.OK:
                STATS.violation(rpc, ReadOutsideRoot, request, seen.summary())
                failures.append(f"{label}: [read outside its root] OK")
            elif seen.code != unseen.code:
                STATS.violation(rpc, ExistenceOracle, request, f"{seen.summary(120)} vs missing: {unseen.summary(120)}")
                failures.append(
                    f"{label}: [existence oracle] {seen.summary(120)} but for missing {missing!r}: "
                    f"{unseen.summary(120)}"
                )
    assert not failures, f"{rpc}: {len(failures)} failures:\n" + "\n".join(failures)


def test_still_serving_after_paths(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)
