"""Typed, frozen views of database rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class KeyRow:
    id: int
    name: str
    prefix: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> KeyRow:
        return cls(r["id"], r["name"], r["prefix"], r["scope"], r["created_at"], r["revoked_at"])


@dataclass(frozen=True)
class AuthKeyRow:
    id: int
    name: str
    prefix: str
    key_hash: bytes
    scope: str

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> AuthKeyRow:
        return cls(r["id"], r["name"], r["prefix"], bytes(r["key_hash"]), r["scope"])


@dataclass(frozen=True)
class ModelRow:
    name: str
    task: str
    source_kind: str
    source_path: str | None
    gguf_file: str | None
    param_bytes: int | None
    required_ram_bytes: int | None
    benchmarked_at: datetime | None
    present: bool

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ModelRow:
        return cls(
            r["name"],
            r["task"],
            r["source_kind"],
            r["source_path"],
            r["gguf_file"],
            r["param_bytes"],
            r["required_ram_bytes"],
            r["benchmarked_at"],
            r["present"],
        )
