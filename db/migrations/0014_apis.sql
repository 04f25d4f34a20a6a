-- Handler APIs (issue 11): a user's project deployed as a catalog model `owner/name` whose engine
-- is the user's code. Each deploy stores a version (extracted under MLCP_DATA_DIR); weights travel
-- apart from code as content-addressed blobs, deduplicated by their SHA-256.

ALTER TABLE models DROP CONSTRAINT models_source_kind_check;
ALTER TABLE models ADD CONSTRAINT models_source_kind_check
    CHECK (source_kind IN ('dir', 'gguf', 'package', 'hf_cache', 'hub', 'apis'));

-- One API per owner (the key's name) and name. `status` is the current version's progress:
-- building (its environment) → benchmarking (the model job queue) → available, or failed with
-- `reason`; deleted APIs keep their row so version numbers never repeat on disk.
CREATE TABLE apis (
    owner       text NOT NULL,
    name        text NOT NULL,
    model       text NOT NULL UNIQUE,
    public      boolean NOT NULL DEFAULT false,
    version     integer NOT NULL CHECK (version >= 1),
    status      text NOT NULL
                CHECK (status IN ('building', 'benchmarking', 'available', 'failed', 'deleted')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, name)
);

-- Every stored version of an API: what was uploaded (its hash), where it was extracted, which
-- spec file it was read from, and which environment (requirements hash; NULL: the agent's own).
CREATE TABLE api_versions (
    owner                text NOT NULL,
    name                 text NOT NULL,
    version              integer NOT NULL CHECK (version >= 1),
    content_sha256       text NOT NULL,
    storage_path         text NOT NULL,
    spec_file            text NOT NULL,
    requirements_sha256  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, name, version),
    FOREIGN KEY (owner, name) REFERENCES apis (owner, name) ON DELETE CASCADE
);

-- Weight files stored once by content (MLCP_DATA_DIR/apis/blobs/<sha256>).
CREATE TABLE api_blobs (
    sha256      text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
