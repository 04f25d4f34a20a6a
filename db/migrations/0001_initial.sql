-- Keys, the catalog, instances and their history.

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    scope       text NOT NULL CHECK (scope IN ('admin', 'user')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE models (
    name                text PRIMARY KEY,
    task                text NOT NULL,
    source_kind         text NOT NULL CHECK (source_kind IN ('dir', 'gguf', 'package', 'hf_cache', 'hub')),
    source_path         text,
    gguf_file           text,
    param_bytes         bigint,
    required_ram_bytes  bigint,
    benchmarked_at      timestamptz,
    present             boolean NOT NULL DEFAULT true,
    discovered_at       timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instances (
    id                  bigserial PRIMARY KEY,
    model               text NOT NULL REFERENCES models (name),
    state               text NOT NULL CHECK (state IN ('STARTING', 'RUNNING', 'STOPPING', 'STOPPED', 'FAILED')),
    reason              text,
    concurrency         integer NOT NULL CHECK (concurrency BETWEEN 1 AND 64),
    expiration_s        integer NOT NULL CHECK (expiration_s BETWEEN 1 AND 2592000),
    runtime             text NOT NULL,
    generation          bigint NOT NULL DEFAULT 1,
    endpoint            text,
    handle              text,
    owner_key_id        bigint REFERENCES api_keys (id),
    inferences          bigint NOT NULL DEFAULT 0,
    last_used_at        timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    observed_mem_bytes  bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    modified_at         timestamptz NOT NULL DEFAULT now()
);

-- One live instance per model; stopped and failed rows stay as history.
CREATE UNIQUE INDEX instances_one_live_per_model ON instances (model)
    WHERE state IN ('STARTING', 'RUNNING', 'STOPPING');
CREATE INDEX instances_expiry ON instances (expires_at) WHERE state = 'RUNNING';

CREATE TABLE instance_events (
    id           bigserial PRIMARY KEY,
    instance_id  bigint NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    from_state   text,
    to_state     text NOT NULL,
    reason       text,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_events_by_instance ON instance_events (instance_id, id);

-- In-flight requests per control plane ("node"), flushed off the request path; the reaper never
-- stops an instance that any live node reports busy.
CREATE TABLE instance_activity (
    instance_id  bigint NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    node_id      text NOT NULL,
    in_flight    integer NOT NULL CHECK (in_flight >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, node_id)
);
