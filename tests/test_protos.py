"""The protos are the public contract: every element documented, conventions kept, stubs importable."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parent.parent / "protos" / "genloom" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))
# Lines that declare something a reader of the contract needs explained.
DECLARATION = re.compile(
    r"^\s*(message|enum|service|oneof)\s+\w+\s*\{"
    r"|^\s*rpc\s+\w+"
    r"|^\s*(optional\s+|repeated\s+)?(map<[^>]+>|[\w.]+)\s+\w+\s*=\s*\d+\s*;"
    r"|^\s*[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;"
)


def test_all_five_protos_exist() -> None:
    assert {p.stem for p in PROTOS} >= {"common", "tokenizer", "inference", "tasks", "finetune"}


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_declaration_has_a_comment(proto: Path) -> None:
    lines = proto.read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        if not DECLARATION.match(line):
            continue
        previous = next((p.strip() for p in reversed(lines[:number]) if p.strip()), "")
        trailing = "//" in line
        # Empty request messages (`message FooRequest {}`) need no comment: the RPC's comment covers them.
        if re.match(r"^\s*message\s+\w+Request\s*\{\s*\}\s*$", line):
            continue
        if not (previous.startswith("//") or trailing):
            undocumented.append(f"{proto.name}:{number + 1}: {line.strip()}")
    assert not undocumented, "undocumented declarations:\n" + "\n".join(undocumented)


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_package_and_enum_conventions(proto: Path) -> None:
    text = proto.read_text()
    assert re.search(r"^package genloom\.v1;$", text, re.M)
    for enum_name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\}", text, re.S):
        first = re.search(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*0\s*;", body, re.M)
        assert first is not None, f"{enum_name} has no zero value"
        assert first.group(1).endswith("_UNSPECIFIED"), f"{enum_name}'s zero value is {first.group(1)}"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_one_request_and_response_message_per_rpc(proto: Path) -> None:
    text = proto.read_text()
    rpcs = re.findall(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(?:stream\s+)?(\w+)", text)
    assert rpcs or proto.stem == "common"
    for name, request, response in rpcs:
        assert request == f"{name}Request", f"rpc {name} takes {request}"
        assert response == f"{name}Response", f"rpc {name} returns {response}"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_stubs_are_generated_and_importable(proto: Path) -> None:
    module = importlib.import_module(f"genloom.v1.{proto.stem}_pb2")
    assert module.DESCRIPTOR.package == "genloom.v1"
    if module.DESCRIPTOR.services_by_name:
        importlib.import_module(f"genloom.v1.{proto.stem}_pb2_grpc")
