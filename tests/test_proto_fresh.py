"""The committed generated stubs equal what scripts/gen_proto.py produces now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = _load_generator().generate(tmp_path)
    assert fresh, "protoc produced nothing"
    committed_dir = ROOT / "proto" / "smartspec" / "v1"
    stale = []
    for path in fresh:
        committed = committed_dir / path.name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(path.name)
    extra = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not stale and not extra, (
        f"generated stubs are stale {stale} or orphaned {sorted(extra)}: run `python scripts/gen_proto.py`"
    )


def test_installed_stubs_import_under_smartspec_v1() -> None:
    from smartspec.v1 import admin_pb2_grpc, controller_pb2, generation_pb2_grpc

    assert controller_pb2.DESCRIPTOR.package == "smartspec.v1"
    assert hasattr(admin_pb2_grpc, "AdminStub")
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
