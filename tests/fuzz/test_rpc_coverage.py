"""The fuzz suite covers every service the protos define (each test module fuzzes every RPC of its service)."""

from __future__ import annotations

import importlib
import pkgutil

import genloom.v1

from .harness import SERVICES


def test_every_genloom_service_is_fuzzed() -> None:
    defined = set()
    for info in pkgutil.iter_modules(genloom.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"genloom.v1.{info.name}")
            defined |= set(module.DESCRIPTOR.services_by_name)
    assert defined == set(SERVICES)
