"""Typed, frozen views of database rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits as stored: None takes the MLCP_DEFAULT_* setting, 0 is unlimited."""

    monthly_calls: int | None = None
    requests_per_minute: int | None = None
    concurrent_streams: int | None = None
    max_apis: int | None = None
    max_instances: int | None = None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> KeyLimits:
        return cls(
            r.get("monthly_calls"),
            r.get("requests_per_minute"),
            r.get("concurrent_streams"),
            r.get("max_apis"),
            r.get("max_instances"),
        )


@dataclass(frozen=True)
class KeyRow:
    id: int
    name: str
    prefix: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None
    disabled_at: datetime | None = None
    expires_at: datetime | None = None
    limits: KeyLimits = KeyLimits()

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> KeyRow:
        return cls(
            r["id"],
            r["name"],
            r["prefix"],
            r["scope"],
            r["created_at"],
            r["revoked_at"],
            r.get("disabled_at"),
            r.get("expires_at"),
            KeyLimits.of(r),
        )


@dataclass(frozen=True)
class AuthKeyRow:
    id: int
    name: str
    prefix: str
    key_hash: bytes
    scope: str
    limits: KeyLimits = KeyLimits()

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> AuthKeyRow:
        return cls(
            r["id"], r["name"], r["prefix"], bytes(r["key_hash"]), r["scope"], KeyLimits.of(r)
        )


@dataclass(frozen=True)
class UsageRow:
    """Calls of one key in one month."""

    key_id: int
    name: str
    scope: str
    revoked: bool
    monthly_calls: int | None
    calls: int

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> UsageRow:
        return cls(
            r["id"],
            r["name"],
            r["scope"],
            r["revoked_at"] is not None,
            r["monthly_calls"],
            int(r["calls"]),
        )


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


@dataclass(frozen=True)
class InstanceRow:
    id: int
    model: str
    state: str
    reason: str | None
    concurrency: int
    expiration_s: int
    runtime: str
    generation: int
    endpoint: str | None
    handle: str | None
    owner_key_id: int | None
    inferences: int
    last_used_at: datetime
    expires_at: datetime
    observed_mem_bytes: int | None
    created_at: datetime
    modified_at: datetime
    device: str = "cpu"
    reserved_bytes: int = 0
    rejected: int = 0
    host_reserved_bytes: int = 0
    launch_seen_at: datetime | None = None
    engine: str | None = None
    # The API version whose files it runs (None: a catalog model).
    api_version: int | None = None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> InstanceRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class InstanceEventRow:
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> InstanceEventRow:
        return cls(r["from_state"], r["to_state"], r["reason"], r["at"])


@dataclass(frozen=True)
class ModelJobRow:
    id: int
    model: str
    state: str
    error_code: str | None
    reason: str | None
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_token: UUID | None
    worker_id: str | None
    heartbeat_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    modified_at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ModelJobRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelProfileRow:
    model: str
    device_kind: str
    required_ram_bytes: int
    peak_gpu_bytes: int | None
    load_s: float
    phases: list[dict[str, Any]]
    job_id: int | None
    measured_at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ModelProfileRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ReservationRow:
    id: int
    model: str
    device: str
    reserved_bytes: int
    state: str
    last_used_at: datetime
    in_flight: int
    reload_s: float
    host_reserved_bytes: int

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ReservationRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PendingLoadRow:
    model: str
    concurrency: int
    expiration_s: int
    owner_key_id: int | None
    measured: bool
    job_state: str | None
    engine: str | None = None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> PendingLoadRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AsyncRequestRow:
    id: UUID
    key_id: int
    model: str
    input: dict[str, Any]
    state: str
    reason: str | None
    result: dict[str, Any] | None
    attempts: int
    lease_token: UUID | None
    created_at: datetime
    pending_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    upload_id: UUID | None = None
    webhook: str | None = None
    webhook_events: list[str] | None = None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> AsyncRequestRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class UploadRow:
    id: UUID
    key_id: int
    extension: str
    state: str
    size_bytes: int | None
    expires_at: datetime
    created_at: datetime
    completed_at: datetime | None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> UploadRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class WebhookDeliveryRow:
    id: UUID
    request_id: UUID
    key_id: int
    url: str
    event: str
    payload: dict[str, Any]
    state: str
    attempts: int
    next_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> WebhookDeliveryRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LifecycleEventRow:
    id: int
    kind: str
    model: str
    instance_id: int | None
    job_id: int | None
    owner_key_id: int | None
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> LifecycleEventRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ApiRow:
    """A handler API (owner/name) and its current version's progress."""

    owner: str
    name: str
    model: str
    public: bool
    version: int
    status: str
    reason: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ApiRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ApiVersionRow:
    """One stored version of an API: its upload's hash and where its files are."""

    owner: str
    name: str
    version: int
    content_sha256: str
    storage_path: str
    spec_file: str
    requirements_sha256: str | None
    created_at: datetime

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> ApiVersionRow:
        return cls(**{f: r[f] for f in cls.__dataclass_fields__})
