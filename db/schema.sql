-- The current schema: what applying every migration in order produces (a test checks it).

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    scope       text NOT NULL CHECK (scope IN ('admin', 'user', 'metrics')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE models (
    name                text PRIMARY KEY,
    task                text NOT NULL,
    source_kind         text NOT NULL CHECK (source_kind IN ('dir', 'gguf', 'package', 'hf_cache', 'hub', 'apis')),
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
    modified_at         timestamptz NOT NULL DEFAULT now(),
    device              text NOT NULL DEFAULT 'cpu',
    reserved_bytes      bigint NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    rejected            bigint NOT NULL DEFAULT 0,
    -- Host memory an instance on a GPU holds beside its VRAM (0 on the host).
    host_reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (host_reserved_bytes >= 0),
    -- Renewed by the control plane launching a STARTING instance (supervisor.check).
    launch_seen_at      timestamptz,
    -- What generates text (instance_agent/engines.py); NULL for models that generate none.
    engine              text CHECK (engine IN ('transformers', 'llama.cpp')),
    -- The API version whose files it runs; NULL for a catalog model (issue 11's rollover).
    api_version         integer CHECK (api_version >= 1)
);

-- One live instance per model (and API version: a redeploy's instance starts beside the
-- previous version's); stopped and failed rows stay as history.
CREATE UNIQUE INDEX instances_one_live_per_model ON instances (model, (coalesce(api_version, 0)))
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

CREATE TABLE model_jobs (
    id            bigserial PRIMARY KEY,
    -- No foreign key: a request for an unknown model is recorded (and failed) too.
    model         text NOT NULL,
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'benchmarking', 'available', 'failed')),
    error_code    text,
    reason        text,
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after     timestamptz NOT NULL DEFAULT now(),
    -- The fence: only the holder of the current token may heartbeat or finish the job.
    lease_token   uuid,
    worker_id     text,
    heartbeat_at  timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    modified_at   timestamptz NOT NULL DEFAULT now()
);

-- One live job per model: concurrent requests collapse onto it through ON CONFLICT.
CREATE UNIQUE INDEX model_jobs_one_live_per_model ON model_jobs (model)
    WHERE state IN ('queued', 'benchmarking');
CREATE INDEX model_jobs_claimable ON model_jobs (run_after, id) WHERE state = 'queued';
CREATE INDEX model_jobs_by_model ON model_jobs (model, id);

-- Wakes listening workers at once instead of at their next poll (procrastinate does the same).
CREATE FUNCTION model_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mlcp_model_jobs', NEW.id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER model_jobs_notify_queued
    AFTER INSERT OR UPDATE OF state ON model_jobs
    FOR EACH ROW WHEN (NEW.state = 'queued')
    EXECUTE FUNCTION model_jobs_notify();

-- The last measurement of a model on one kind of device; `phases` holds one entry per measured
-- concurrency (peak memory is cumulative, so it never decreases from one phase to the next).
CREATE TABLE model_profiles (
    model               text NOT NULL REFERENCES models (name),
    device_kind         text NOT NULL,
    required_ram_bytes  bigint NOT NULL CHECK (required_ram_bytes > 0),
    peak_gpu_bytes      bigint,
    load_s              double precision NOT NULL,
    phases              jsonb NOT NULL,
    job_id              bigint REFERENCES model_jobs (id) ON DELETE SET NULL,
    measured_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, device_kind)
);

-- The highest memory running instances reported, per concurrency, to correct profiles over time.
CREATE TABLE model_observations (
    model           text NOT NULL REFERENCES models (name),
    device_kind     text NOT NULL,
    concurrency     integer NOT NULL CHECK (concurrency >= 1),
    peak_rss_bytes  bigint NOT NULL CHECK (peak_rss_bytes >= 0),
    peak_gpu_bytes  bigint,
    observed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, device_kind, concurrency)
);

-- The deployment's identity: instances are labelled with it, so two mlcp deployments on one host
-- (or two test databases) never adopt or remove each other's instances.
CREATE TABLE cluster (
    id          text PRIMARY KEY,
    singleton   boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A load asked with "benchmark": true waits here until its model is measured.
CREATE TABLE pending_loads (
    model          text PRIMARY KEY REFERENCES models (name),
    concurrency    integer NOT NULL CHECK (concurrency BETWEEN 1 AND 64),
    expiration_s   integer NOT NULL CHECK (expiration_s BETWEEN 1 AND 2592000),
    owner_key_id   bigint REFERENCES api_keys (id),
    requested_at   timestamptz NOT NULL DEFAULT now(),
    -- The engine the load asked for; NULL: the model's default (instance_agent/engines.py).
    engine         text CHECK (engine IN ('transformers', 'llama.cpp'))
);


CREATE TABLE async_requests (
    id              uuid PRIMARY KEY,
    key_id          bigint NOT NULL REFERENCES api_keys (id),
    model           text NOT NULL,
    input           jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'accepted'
                    CHECK (state IN ('accepted', 'pending', 'processing', 'success', 'failed',
                                     'cancelled')),
    -- Why a pending request waits, or why a failed one failed.
    reason          text,
    result          jsonb,
    -- Fair share: a request's place among its key's live requests when it was submitted, so one
    -- key's thousand queued requests do not starve another key's one.
    key_rank        integer NOT NULL CHECK (key_rank >= 0),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer NOT NULL DEFAULT 2 CHECK (max_attempts >= 1),
    run_after       timestamptz NOT NULL DEFAULT now(),
    -- The fence: only the holder of the current token may heartbeat or finish the request.
    lease_token     uuid,
    worker_id       text,
    heartbeat_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    pending_at      timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz
);

-- Claimable requests only (queued, no lease), in claim order; and a key's live requests, which
-- a submit counts (the burst bound, the fair-share rank).
CREATE INDEX async_requests_claimable ON async_requests (key_rank, created_at)
    WHERE state IN ('accepted', 'pending') AND lease_token IS NULL;
CREATE INDEX async_requests_live_by_key ON async_requests (key_id, key_rank)
    WHERE state IN ('accepted', 'pending', 'processing');
CREATE INDEX async_requests_leased ON async_requests (heartbeat_at)
    WHERE state IN ('pending', 'processing') AND lease_token IS NOT NULL;
CREATE INDEX async_requests_by_key ON async_requests (key_id, created_at DESC, id DESC);
CREATE INDEX async_requests_finished ON async_requests (finished_at)
    WHERE finished_at IS NOT NULL;

-- Lifecycle events for GET /events: instance transitions (evictions told apart) and model job
-- transitions, copied by triggers from the history the control plane already writes, numbered
-- for Last-Event-ID replay, and announced on channel mlcp_events to every control plane.
CREATE TABLE lifecycle_events (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('instance', 'eviction', 'job')),
    model         text NOT NULL,
    instance_id   bigint,
    job_id        bigint,
    -- The key that loaded the instance; NULL for job events (the catalog is shared).
    owner_key_id  bigint,
    from_state    text,
    to_state      text NOT NULL,
    reason        text,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lifecycle_events_by_owner ON lifecycle_events (owner_key_id, id);

CREATE FUNCTION lifecycle_events_from_instance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO lifecycle_events
        (kind, model, instance_id, owner_key_id, from_state, to_state, reason, at)
    SELECT CASE WHEN NEW.reason LIKE 'evicted%' THEN 'eviction' ELSE 'instance' END,
           i.model, i.id, i.owner_key_id, NEW.from_state, NEW.to_state, NEW.reason, NEW.at
    FROM instances i WHERE i.id = NEW.instance_id
    RETURNING id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('mlcp_events', new_id::text);
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER instance_events_publish
    AFTER INSERT ON instance_events
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_instance();

-- A new instance is a transition from nothing (its creation writes no instance_events row).
CREATE FUNCTION lifecycle_events_from_new_instance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO lifecycle_events (kind, model, instance_id, owner_key_id, to_state, reason, at)
    VALUES ('instance', NEW.model, NEW.id, NEW.owner_key_id, NEW.state, NEW.reason, NEW.created_at)
    RETURNING id INTO new_id;
    PERFORM pg_notify('mlcp_events', new_id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER instances_publish_insert
    AFTER INSERT ON instances
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_new_instance();

CREATE FUNCTION lifecycle_events_from_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
    old_state text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        old_state := OLD.state;
    END IF;
    INSERT INTO lifecycle_events (kind, model, job_id, from_state, to_state, reason)
    VALUES ('job', NEW.model, NEW.id, old_state, NEW.state, NEW.reason)
    RETURNING id INTO new_id;
    PERFORM pg_notify('mlcp_events', new_id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER model_jobs_publish_insert
    AFTER INSERT ON model_jobs
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_job();
CREATE TRIGGER model_jobs_publish_update
    AFTER UPDATE OF state ON model_jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION lifecycle_events_from_job();

-- Keys can be disabled and enabled again (revoking is for good), and carry an optional expiry.
ALTER TABLE api_keys
    ADD COLUMN disabled_at timestamptz,
    ADD COLUMN expires_at  timestamptz;

-- Secrets every control plane of a deployment shares (the upload-URL signing key).
CREATE TABLE server_secrets (
    name        text PRIMARY KEY,
    secret      bytea NOT NULL CHECK (length(secret) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- An upload slot: 'open' until a PUT takes it ('writing'), 'complete' once the bytes are on disk.
CREATE TABLE uploads (
    id            uuid PRIMARY KEY,
    key_id        bigint NOT NULL REFERENCES api_keys (id),
    extension     text NOT NULL,
    state         text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'writing', 'complete')),
    size_bytes    bigint CHECK (size_bytes >= 0),
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    writing_at    timestamptz,
    completed_at  timestamptz
);

CREATE INDEX uploads_by_created ON uploads (created_at);

-- Which upload a request reads, and where (and for which of its statuses) it calls back.
ALTER TABLE async_requests
    ADD COLUMN upload_id       uuid REFERENCES uploads (id),
    ADD COLUMN webhook         text,
    ADD COLUMN webhook_events  text[];

CREATE INDEX async_requests_by_upload ON async_requests (upload_id) WHERE upload_id IS NOT NULL;

-- The secret a key's webhook deliveries are signed with (Standard Webhooks: whsec_<base64>).
CREATE TABLE webhook_secrets (
    key_id      bigint PRIMARY KEY REFERENCES api_keys (id),
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One delivery per status change a request's webhook asked for, with the request as it was
-- then; retried with backoff until delivered or out of attempts.
CREATE TABLE webhook_deliveries (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id    uuid NOT NULL REFERENCES async_requests (id) ON DELETE CASCADE,
    key_id        bigint NOT NULL,
    url           text NOT NULL,
    event         text NOT NULL,
    payload       jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_at       timestamptz NOT NULL DEFAULT now(),
    last_status   integer,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_request ON webhook_deliveries (request_id, created_at);

-- Every status change a webhook asked for becomes a delivery in the same transaction, whichever
-- statement made it (finish, cancel, a reclaim that gave up), so none is lost to a crash.
CREATE FUNCTION webhook_deliveries_from_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (request_id, key_id, url, event, payload)
    VALUES (NEW.id, NEW.key_id, NEW.webhook, NEW.state, jsonb_build_object(
        'id', NEW.id, 'model', NEW.model, 'status', NEW.state,
        'result', CASE WHEN NEW.state = 'success' THEN NEW.result END,
        'error', CASE WHEN NEW.state IN ('failed', 'cancelled') THEN NEW.reason END,
        'attempts', NEW.attempts,
        'timestamps', jsonb_build_object(
            'accepted', NEW.created_at, 'pending', NEW.pending_at,
            'processing', NEW.started_at, 'finished', NEW.finished_at)));
    RETURN NEW;
END;
$$;
CREATE TRIGGER async_requests_webhook
    AFTER UPDATE OF state ON async_requests
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.webhook IS NOT NULL
                       AND NEW.state = ANY (NEW.webhook_events))
    EXECUTE FUNCTION webhook_deliveries_from_request();

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
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Last asked for (HEAD) or uploaded (PUT): unlinked blobs go MLCP_BLOB_GRACE_S after it.
    used_at     timestamptz NOT NULL DEFAULT now()
);

-- Per-key limits (null: the MLCP_DEFAULT_* setting; 0: unlimited), and calls per key per month.
ALTER TABLE api_keys
    ADD COLUMN monthly_calls       integer CHECK (monthly_calls >= 0),
    ADD COLUMN requests_per_minute integer CHECK (requests_per_minute >= 0),
    ADD COLUMN concurrent_streams  integer CHECK (concurrent_streams >= 0),
    ADD COLUMN max_apis            integer CHECK (max_apis >= 0),
    ADD COLUMN max_instances       integer CHECK (max_instances >= 0);

-- The calls of one key in one month (UTC). `held` is what control planes have reserved from the
-- key's monthly quota and not served yet (each spends its block in memory): calls + held never
-- exceed the limit, so no control plane can serve a call another one already counted.
CREATE TABLE key_usage (
    key_id      bigint NOT NULL REFERENCES api_keys (id),
    month       date NOT NULL CHECK (extract(day FROM month) = 1),
    calls       bigint NOT NULL DEFAULT 0 CHECK (calls >= 0),
    held        bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    -- The size of the last block granted: an UPDATE's SET sees the old row, RETURNING the new.
    last_grant  bigint NOT NULL DEFAULT 0 CHECK (last_grant >= 0),
    PRIMARY KEY (key_id, month)
);

CREATE INDEX key_usage_by_month ON key_usage (month);
