-- Model jobs (fetch and benchmark a model), measured profiles, and memory observed in service.

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
