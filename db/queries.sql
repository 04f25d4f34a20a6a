-- Named queries: each block starts with "-- name: <name>" and uses $1..$n parameters.
-- db/queries.py wraps every block in one typed function.

-- name: insert_key
-- Store a new key (only its hash and display prefix).
-- $1 = name, $2 = prefix, $3 = key_hash, $4 = scope
INSERT INTO api_keys (name, prefix, key_hash, scope)
VALUES ($1, $2, $3, $4)
RETURNING id, name, prefix, scope, created_at, revoked_at;

-- name: get_active_key_by_hash
-- The usable key with this hash, with its limits (null: the setting's default).
-- $1 = key_hash
SELECT id, name, prefix, key_hash, scope, monthly_calls, requests_per_minute, concurrent_streams, max_apis,
       max_instances
FROM api_keys
WHERE key_hash = $1 AND revoked_at IS NULL AND disabled_at IS NULL
  AND (expires_at IS NULL OR expires_at > now());

-- name: list_keys
-- Every key with its state and limits, oldest first (no $n).
SELECT id, name, prefix, scope, created_at, revoked_at, disabled_at, expires_at,
       monthly_calls, requests_per_minute, concurrent_streams, max_apis,
       max_instances
FROM api_keys
ORDER BY id;

-- name: count_active_admin_keys
-- How many admin keys are not revoked (the last one may not be revoked).
SELECT count(*) FROM api_keys WHERE scope = 'admin' AND revoked_at IS NULL;

-- name: lock_admin_keys
-- Serialize changes to the set of admin keys until the transaction ends (no $n).
SELECT pg_advisory_xact_lock(7235931);

-- name: revoke_key
-- Revoke a key unless it is the last active admin key; the caller holds lock_admin_keys.
-- $1 = key_id
UPDATE api_keys SET revoked_at = now()
WHERE id = $1 AND revoked_at IS NULL
  AND (scope <> 'admin' OR EXISTS (
      SELECT 1 FROM api_keys o WHERE o.scope = 'admin' AND o.revoked_at IS NULL AND o.id <> $1))
RETURNING id, name, prefix, scope, created_at, revoked_at;

-- name: get_active_key
-- One key that is usable now (not revoked, disabled or expired), by id, with its limits.
-- $1 = key_id
SELECT id, name, prefix, scope, created_at, revoked_at, disabled_at, expires_at,
       monthly_calls, requests_per_minute, concurrent_streams, max_apis, max_instances
FROM api_keys
WHERE id = $1 AND revoked_at IS NULL AND disabled_at IS NULL
  AND (expires_at IS NULL OR expires_at > now());

-- name: restore_admin_key
-- Make the key with this hash an active admin key again (MLCP_ADMIN_KEY is authoritative).
-- $1 = key_hash
UPDATE api_keys SET revoked_at = NULL, scope = 'admin'
WHERE key_hash = $1
RETURNING id, name, prefix, scope, created_at, revoked_at;

-- name: upsert_discovered_model
-- Record (or refresh) a model found on disk or in a package; keeps its measurements.
-- $1 = name, $2 = task, $3 = source_kind, $4 = source_path, $5 = gguf_file, $6 = param_bytes
INSERT INTO models (name, task, source_kind, source_path, gguf_file, param_bytes, present)
VALUES ($1, $2, $3, $4, $5, $6, true)
ON CONFLICT (name) DO UPDATE
SET task = EXCLUDED.task,
    source_kind = EXCLUDED.source_kind,
    source_path = EXCLUDED.source_path,
    gguf_file = EXCLUDED.gguf_file,
    param_bytes = EXCLUDED.param_bytes,
    present = true,
    updated_at = now()
WHERE models.source_kind <> 'apis'
  AND (models.task, models.source_kind, models.source_path, models.gguf_file,
       models.param_bytes, models.present)
      IS DISTINCT FROM
      (EXCLUDED.task, EXCLUDED.source_kind, EXCLUDED.source_path, EXCLUDED.gguf_file,
       EXCLUDED.param_bytes, true);

-- name: mark_models_absent_except
-- Hide local models no longer found (hub downloads stay).
-- $1 = names
UPDATE models SET present = false, updated_at = now()
WHERE present AND source_kind NOT IN ('hub', 'apis') AND NOT (name = ANY($1::text[]));

-- name: list_models
-- The catalog: every model present, by name.
SELECT name, task, source_kind, source_path, gguf_file, param_bytes, required_ram_bytes,
       benchmarked_at, present
FROM models
WHERE present
ORDER BY name;

-- name: get_model
-- One catalog model by name, present or not.
-- $1 = name
SELECT name, task, source_kind, source_path, gguf_file, param_bytes, required_ram_bytes,
       benchmarked_at, present
FROM models
WHERE name = $1;

-- instances ------------------------------------------------------------------------------------

-- name: update_live_instance_settings
-- Change a live instance's concurrency and expiry, sliding its expiry from its last use.
-- $1 = model, $2 = concurrency, $3 = expiration_s
UPDATE instances
SET concurrency = $2,
    expiration_s = $3,
    expires_at = greatest(last_used_at, now()) + make_interval(secs => $3::integer),
    modified_at = now()
WHERE model = $1 AND state IN ('STARTING', 'RUNNING')
RETURNING *;

-- name: transition_instance
-- Move an instance to a state if it is in an allowed one, recording the event.
-- $1 = instance_id, $2 = to, $3 = reason, $4 = allowed_from
WITH moved AS (
    UPDATE instances
    SET state = $2, reason = $3, modified_at = now()
    WHERE id = $1 AND state = ANY($4::text[])
    RETURNING *
), prior AS (
    SELECT state FROM instances WHERE id = $1
), event AS (
    INSERT INTO instance_events (instance_id, from_state, to_state, reason)
    SELECT moved.id, (SELECT state FROM prior), $2, $3 FROM moved
)
SELECT * FROM moved;

-- name: mark_running
-- STARTING -> RUNNING once the agent is healthy, with where it listens; expiry starts now.
-- $1 = instance_id, $2 = endpoint, $3 = handle
WITH moved AS (
    UPDATE instances
    SET state = 'RUNNING', reason = 'healthy', endpoint = $2, handle = $3,
        last_used_at = now(), expires_at = now() + make_interval(secs => expiration_s),
        modified_at = now()
    WHERE id = $1 AND state = 'STARTING'
    RETURNING *
), event AS (
    INSERT INTO instance_events (instance_id, from_state, to_state, reason)
    SELECT id, 'STARTING', 'RUNNING', 'healthy' FROM moved
)
SELECT * FROM moved;

-- name: set_instance_handle
-- Note the runtime's handle and endpoint of an instance as soon as it is launched.
-- $1 = instance_id, $2 = handle, $3 = endpoint
UPDATE instances SET handle = $2, endpoint = $3, modified_at = now()
WHERE id = $1
RETURNING *;

-- name: get_instance
-- One instance by id.
-- $1 = instance_id
SELECT * FROM instances WHERE id = $1;

-- name: latest_instance_for_model
-- A model's newest instance, live or not.
-- $1 = model
SELECT * FROM instances WHERE model = $1 ORDER BY id DESC LIMIT 1;

-- name: renew_launches
-- The launcher's heartbeat on the STARTING instances it is launching.
-- $1 = instance_ids
UPDATE instances SET launch_seen_at = now()
WHERE id = ANY($1::bigint[]) AND state = 'STARTING';

-- name: live_instances
-- Every instance that is starting, running or stopping.
SELECT * FROM instances WHERE state IN ('STARTING', 'RUNNING', 'STOPPING') ORDER BY id;

-- name: live_instances_for_model
-- A model's instances that are starting, running or stopping, oldest first (an API being
-- rolled over has two: the previous version's and the new one's).
-- $1 = model
SELECT * FROM instances
WHERE model = $1 AND state IN ('STARTING', 'RUNNING', 'STOPPING') ORDER BY id;

-- name: instance_events
-- An instance's state history, oldest first.
-- $1 = instance_id
SELECT from_state, to_state, reason, at FROM instance_events
WHERE instance_id = $1 ORDER BY id;

-- name: record_activity
-- One flush of a control plane's in-memory counters for one instance ($2 new inferences,
-- $3 seconds since the last finished request ended, by the control plane's monotonic clock, or
-- null; $4 requests in flight now, $5 node, $6 requests refused because the instance was full).
-- The end time is placed on the database's clock, never the control plane's wall clock.
-- $1 = instance_id, $2 = new_inferences, $3 = ended_s_ago, $4 = in_flight, $5 = node_id,
-- $6 = new_rejected
WITH ended AS (
    SELECT now() - make_interval(secs => $3::double precision) AS at
), bumped AS (
    UPDATE instances
    SET inferences = inferences + $2,
        rejected = rejected + $6,
        last_used_at = CASE WHEN $3::double precision IS NULL THEN last_used_at
                            ELSE greatest(last_used_at, (SELECT at FROM ended)) END,
        expires_at = CASE WHEN $3::double precision IS NULL THEN expires_at
                          ELSE greatest(expires_at, (SELECT at FROM ended) + make_interval(secs => expiration_s)) END,
        modified_at = CASE WHEN $2 > 0 THEN now() ELSE modified_at END
    WHERE id = $1
    RETURNING id
)
INSERT INTO instance_activity (instance_id, node_id, in_flight, updated_at)
SELECT id, $5, $4, now() FROM bumped
ON CONFLICT (instance_id, node_id) DO UPDATE
SET in_flight = EXCLUDED.in_flight, updated_at = EXCLUDED.updated_at;

-- name: claim_expired_instances
-- Expired RUNNING instances that no live control plane reports busy move to STOPPING; a
-- node's in-flight report older than $2 seconds counts as dead.
-- $1 = now, $2 = stale_after_s
WITH due AS (
    SELECT i.id FROM instances i
    WHERE i.state = 'RUNNING' AND i.expires_at <= $1
      AND NOT EXISTS (
          SELECT 1 FROM instance_activity a
          WHERE a.instance_id = i.id AND a.in_flight > 0
            AND a.updated_at > now() - make_interval(secs => $2::double precision)
      )
    ORDER BY i.expires_at
    LIMIT 500
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE instances i
    SET state = 'STOPPING',
        reason = 'expired after ' || i.expiration_s || ' s without requests',
        modified_at = now()
    FROM due WHERE i.id = due.id
    RETURNING i.*
), event AS (
    INSERT INTO instance_events (instance_id, from_state, to_state, reason)
    SELECT id, 'RUNNING', 'STOPPING', reason FROM moved
)
SELECT * FROM moved;

-- name: record_observed_memory
-- Raise an instance's highest observed memory (from its health checks).
-- $1 = instance_id, $2 = mem_bytes
UPDATE instances SET observed_mem_bytes = greatest(coalesce(observed_mem_bytes, 0), $2)
WHERE id = $1;

-- jobs and profiles ----------------------------------------------------------------------------

-- name: enqueue_model_job
-- Queue a job unless one is live; concurrent callers collapse onto one row. No row comes back
-- when another transaction's live job won; the caller then reads that one.
-- $1 = model
INSERT INTO model_jobs (model) VALUES ($1)
ON CONFLICT (model) WHERE state IN ('queued', 'benchmarking') DO NOTHING
RETURNING *;

-- name: insert_failed_model_job
-- A request that fails before any work (unknown model while offline) is recorded as a job too.
-- $1 = model, $2 = error_code, $3 = reason
INSERT INTO model_jobs (model, state, error_code, reason, started_at, finished_at)
VALUES ($1, 'failed', $2, $3, now(), now())
RETURNING *;

-- name: latest_model_job
-- A model's newest benchmark job in one of the given states.
-- $1 = model, $2 = states
SELECT * FROM model_jobs
WHERE model = $1 AND state = ANY($2::text[])
ORDER BY id DESC
LIMIT 1;

-- name: claim_model_job
-- The oldest due job, or one whose worker stopped heartbeating $3 seconds ago; the new lease
-- token ($2) fences off the previous holder.
-- $1 = worker_id, $2 = token, $3 = stale_after_s
UPDATE model_jobs
SET state = 'benchmarking', lease_token = $2, worker_id = $1, heartbeat_at = now(),
    attempts = attempts + 1, started_at = coalesce(started_at, now()), modified_at = now()
WHERE id = (
    SELECT id FROM model_jobs
    WHERE (state = 'queued' AND run_after <= now())
       OR (state = 'benchmarking'
           AND heartbeat_at < now() - make_interval(secs => $3::double precision))
    ORDER BY run_after, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING *;

-- name: heartbeat_model_job
-- Keep a held job's lease alive; no row when the lease was lost.
-- $1 = job_id, $2 = token
UPDATE model_jobs SET heartbeat_at = now()
WHERE id = $1 AND lease_token = $2 AND state = 'benchmarking'
RETURNING id;

-- name: finish_model_job
-- 'available' or 'failed' for good; no row when the lease was taken over (a late result).
-- $1 = job_id, $2 = token, $3 = state, $4 = error_code, $5 = reason
UPDATE model_jobs
SET state = $3, error_code = $4, reason = $5, finished_at = now(), lease_token = NULL,
    heartbeat_at = NULL, modified_at = now()
WHERE id = $1 AND lease_token = $2 AND state = 'benchmarking'
RETURNING *;

-- name: retry_model_job
-- Requeue a held job after a failure that may pass, after a delay.
-- $1 = job_id, $2 = token, $3 = error_code, $4 = reason, $5 = delay_s
UPDATE model_jobs
SET state = 'queued', error_code = $3, reason = $4,
    run_after = now() + make_interval(secs => $5::double precision),
    lease_token = NULL, heartbeat_at = NULL, worker_id = NULL, modified_at = now()
WHERE id = $1 AND lease_token = $2 AND state = 'benchmarking'
RETURNING *;

-- name: release_model_job
-- A worker shutting down hands its job back without spending an attempt.
-- $1 = job_id, $2 = token
UPDATE model_jobs
SET state = 'queued', attempts = greatest(attempts - 1, 0), lease_token = NULL,
    heartbeat_at = NULL, worker_id = NULL, modified_at = now()
WHERE id = $1 AND lease_token = $2 AND state = 'benchmarking'
RETURNING id;

-- name: upsert_model_profile
-- Store a model's measured memory profile for a device kind.
-- $1 = model, $2 = device_kind, $3 = required_ram_bytes, $4 = peak_gpu_bytes, $5 = load_s, $6 = phases, $7 = job_id
INSERT INTO model_profiles (model, device_kind, required_ram_bytes, peak_gpu_bytes, load_s,
                            phases, job_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (model, device_kind) DO UPDATE
SET required_ram_bytes = EXCLUDED.required_ram_bytes,
    peak_gpu_bytes = EXCLUDED.peak_gpu_bytes,
    load_s = EXCLUDED.load_s,
    phases = EXCLUDED.phases,
    job_id = EXCLUDED.job_id,
    measured_at = now();

-- name: set_model_measured
-- Mark a model benchmarked, with the memory it needs.
-- $1 = model, $2 = required_ram_bytes
UPDATE models SET required_ram_bytes = $2, benchmarked_at = now(), updated_at = now()
WHERE name = $1;

-- name: get_model_profile
-- A model's measured profile for a device kind.
-- $1 = model, $2 = device_kind
SELECT * FROM model_profiles WHERE model = $1 AND device_kind = $2;

-- name: record_model_observation
-- Keep the highest memory a running instance reached at this concurrency; a peak at concurrency
-- 1 above the catalog figure raises the figure, so profiles are corrected over time.
-- $1 = model, $2 = device_kind, $3 = concurrency, $4 = peak_rss_bytes, $5 = peak_gpu_bytes
WITH seen AS (
    INSERT INTO model_observations (model, device_kind, concurrency, peak_rss_bytes,
                                    peak_gpu_bytes)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (model, device_kind, concurrency) DO UPDATE
    SET peak_rss_bytes = greatest(model_observations.peak_rss_bytes, EXCLUDED.peak_rss_bytes),
        peak_gpu_bytes = greatest(model_observations.peak_gpu_bytes, EXCLUDED.peak_gpu_bytes),
        observed_at = now()
    RETURNING *
)
UPDATE models m
SET required_ram_bytes = seen.peak_rss_bytes, updated_at = now()
FROM seen
WHERE m.name = seen.model AND seen.concurrency = 1
  AND m.required_ram_bytes IS NOT NULL AND seen.peak_rss_bytes > m.required_ram_bytes;

-- name: observed_peaks
-- The highest memory running instances of a model reached on one kind of device, at this
-- concurrency or below. $1 = model, $2 = device_kind, $3 = concurrency
-- $1 = model, $2 = device_kind, $3 = concurrency
SELECT max(peak_rss_bytes) AS rss_bytes, max(peak_gpu_bytes) AS gpu_bytes
FROM model_observations
WHERE model = $1 AND device_kind = $2 AND concurrency <= $3;

-- name: lock_model_requests
-- Serializes /model/job decisions for one model (across control planes) until the transaction ends.
-- $1 = model
SELECT pg_advisory_xact_lock(hashtextextended('mlcp:model_job:' || $1, 0));

-- name: cluster_id
-- The id of this database's cluster: labels every instance its control planes start.
SELECT id FROM cluster;

-- admission ------------------------------------------------------------------------------------

-- name: lock_admission
-- Serializes admission between control planes sharing one database (and so one host's memory).
SELECT pg_advisory_xact_lock(7301);

-- name: reservations
-- Memory held per live instance and device, with in-flight counts from fresh activity reports:
-- admission's ledger.
-- $1 = stale_after_s
SELECT i.id, i.model, i.device, i.reserved_bytes, i.host_reserved_bytes, i.state,
       i.last_used_at,
       coalesce((SELECT sum(a.in_flight) FROM instance_activity a
                 WHERE a.instance_id = i.id
                   AND a.updated_at > now() - make_interval(secs => $1::double precision)), 0)
           AS in_flight,
       coalesce((SELECT p.load_s FROM model_profiles p
                 WHERE p.model = i.model
                   AND p.device_kind = split_part(i.device, ':', 1)
                 ORDER BY p.measured_at DESC LIMIT 1), 0.0) AS reload_s
FROM instances i
WHERE i.state IN ('STARTING', 'RUNNING', 'STOPPING')
ORDER BY i.id;

-- name: insert_admitted_instance
-- A new STARTING instance with what admission reserved for it (on its device, and on the host),
-- recording the API version whose files it runs when $11 is an API version's folder.
-- $1 = model, $2 = concurrency, $3 = expiration_s, $4 = runtime, $5 = owner, $6 = device,
-- $7 = reserved_bytes, $8 = reason, $9 = host_reserved_bytes, $10 = engine, $11 = source_path
INSERT INTO instances (model, state, reason, concurrency, expiration_s, runtime, owner_key_id,
                       expires_at, device, reserved_bytes, host_reserved_bytes, engine,
                       api_version)
VALUES ($1, 'STARTING', $8, $2, $3, $4, $5, now() + make_interval(secs => $3::integer), $6, $7,
        $9, $10,
        (SELECT v.version FROM apis a
         JOIN api_versions v ON v.owner = a.owner AND v.name = a.name
         WHERE a.model = $1 AND v.storage_path = $11::text))
ON CONFLICT (model, (coalesce(api_version, 0))) WHERE state IN ('STARTING', 'RUNNING', 'STOPPING')
DO NOTHING
RETURNING *;

-- name: evict_instance
-- RUNNING and idle only: a request in flight on any live node protects it.
-- $1 = instance_id, $2 = reason, $3 = stale_after_s
WITH moved AS (
    UPDATE instances i
    SET state = 'STOPPING', reason = $2, modified_at = now()
    WHERE i.id = $1 AND i.state = 'RUNNING'
      AND NOT EXISTS (
          SELECT 1 FROM instance_activity a
          WHERE a.instance_id = i.id AND a.in_flight > 0
            AND a.updated_at > now() - make_interval(secs => $3::double precision)
      )
    RETURNING i.*
), event AS (
    INSERT INTO instance_events (instance_id, from_state, to_state, reason)
    SELECT id, 'RUNNING', 'STOPPING', $2 FROM moved
)
SELECT * FROM moved;

-- name: upsert_pending_load
-- Remember a load that waits for its model's benchmark (the latest request wins).
-- $1 = model, $2 = concurrency, $3 = expiration_s, $4 = owner, $5 = engine
INSERT INTO pending_loads (model, concurrency, expiration_s, owner_key_id, engine)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (model) DO UPDATE
SET concurrency = EXCLUDED.concurrency, expiration_s = EXCLUDED.expiration_s,
    owner_key_id = EXCLUDED.owner_key_id, engine = EXCLUDED.engine, requested_at = now();

-- name: pending_loads
-- Loads waiting on a benchmark, with whether the model is measured or its job failed.
SELECT p.model, p.concurrency, p.expiration_s, p.owner_key_id, p.engine,
       m.required_ram_bytes IS NOT NULL AS measured,
       (SELECT j.state FROM model_jobs j WHERE j.model = p.model ORDER BY j.id DESC LIMIT 1)
           AS job_state
FROM pending_loads p JOIN models m ON m.name = p.model
ORDER BY p.requested_at;

-- name: delete_pending_load
-- Forget a model's pending load.
-- $1 = model
DELETE FROM pending_loads WHERE model = $1;

-- name: evictions_for_model
-- How many times a model's instances were evicted (shown by /model/status).
-- $1 = model
SELECT count(*) FROM instance_events e JOIN instances i ON i.id = e.instance_id
WHERE i.model = $1 AND e.to_state = 'STOPPING' AND e.reason LIKE 'evicted%';

-- name: set_reserved_bytes
-- A live instance's larger reservation (its device, and the host beside a GPU).
-- $1 = instance id, $2 = reserved_bytes, $3 = host_reserved_bytes
UPDATE instances SET reserved_bytes = $2, host_reserved_bytes = $3, modified_at = now()
WHERE id = $1 AND state IN ('STARTING', 'RUNNING')
RETURNING *;

-- async requests -------------------------------------------------------------------------------

-- name: insert_async_requests
-- Store a burst of requests in one statement ($1: a JSON array of {"seq", "id", "key_id",
-- "model", "input", "upload_id", "webhook", "webhook_events", "max_live"}); one is stored unless
-- its key would then have more than its max_live live ones (the burst bound; no row for it).
-- Its fair-share rank follows its key's live requests and those before it in the burst, so a
-- key's requests stay in order.
-- $1 = burst
WITH burst AS (
    SELECT b.*, row_number() OVER (PARTITION BY b.key_id ORDER BY b.seq) AS nth
    FROM jsonb_to_recordset($1::jsonb) AS b(
        seq integer, id uuid, key_id bigint, model text, input jsonb, upload_id uuid,
        webhook text, webhook_events text[], max_live integer)
), live AS (
    SELECT key_id, count(*) AS n, max(key_rank) AS top
    FROM async_requests
    WHERE key_id IN (SELECT key_id FROM burst) AND state IN ('accepted', 'pending', 'processing')
    GROUP BY key_id
)
INSERT INTO async_requests (id, key_id, model, input, key_rank, upload_id, webhook, webhook_events)
SELECT b.id, b.key_id, b.model, b.input, coalesce(l.top, -1) + b.nth, b.upload_id, b.webhook,
       b.webhook_events
FROM burst b LEFT JOIN live l ON l.key_id = b.key_id
WHERE coalesce(l.n, 0) + b.nth <= b.max_live
RETURNING *;

-- name: get_async_request
-- One request of one key.
-- $1 = id, $2 = key_id
SELECT * FROM async_requests WHERE id = $1 AND key_id = $2;

-- name: list_async_requests
-- A key's requests, newest first, after the cursor request (none: from the newest).
-- $1 = key_id, $2 = after_id, $3 = limit
SELECT * FROM async_requests
WHERE key_id = $1
  AND ($2::uuid IS NULL OR (created_at, id) < (
      SELECT created_at, id FROM async_requests WHERE id = $2 AND key_id = $1))
ORDER BY created_at DESC, id DESC
LIMIT $3;

-- name: cancel_async_request
-- Cancel a request that has not finished; a processing one is aborted by its holder, whose
-- heartbeat stops matching.
-- $1 = id, $2 = key_id
UPDATE async_requests
SET state = 'cancelled', reason = 'cancelled by the client', finished_at = now(),
    lease_token = NULL, heartbeat_at = NULL
WHERE id = $1 AND key_id = $2 AND state IN ('accepted', 'pending', 'processing')
RETURNING *;

-- name: claim_async_requests
-- Up to $2 of the fairest due requests (lowest rank, then oldest) become 'pending', each under a
-- new lease, until an instance takes them; fairest first. One statement for the whole batch.
-- Committed without waiting for the WAL flush (as start and heartbeat are): the claim answers
-- no client, and a database crash that loses it only hands the requests out again, under the
-- fence of their lease tokens; a later finish, stored synchronously, flushes it too.
-- $1 = worker_id, $2 = limit
WITH relaxed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), due AS (
    SELECT id FROM async_requests
    WHERE state IN ('accepted', 'pending') AND lease_token IS NULL AND run_after <= now()
    ORDER BY key_rank, created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE async_requests r
    SET state = 'pending', lease_token = gen_random_uuid(), worker_id = $1, heartbeat_at = now(),
        pending_at = coalesce(r.pending_at, now())
    FROM due, relaxed
    WHERE r.id = due.id
    RETURNING r.*
)
SELECT * FROM claimed ORDER BY key_rank, created_at;

-- name: reclaim_async_requests
-- Requests whose holder stopped heartbeating: a pending one is queued again, a processing one is
-- retried while attempts remain, else failed with the reason. Rows are locked in id order (as
-- every statement on several requests does, so none deadlocks another), skipping those a live
-- holder is renewing.
-- $1 = lease_s
WITH expired AS MATERIALIZED (
    SELECT id FROM async_requests
    WHERE state IN ('pending', 'processing') AND lease_token IS NOT NULL
      AND heartbeat_at < now() - make_interval(secs => $1::double precision)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE async_requests r
SET state = CASE WHEN r.state = 'processing' AND r.attempts >= r.max_attempts
                 THEN 'failed' ELSE 'pending' END,
    reason = CASE WHEN r.state <> 'processing' THEN r.reason
                  WHEN r.attempts >= r.max_attempts
                  THEN 'the control plane processing it stopped, ' || r.attempts || ' attempts'
                  ELSE 'retrying: the control plane processing it stopped' END,
    finished_at = CASE WHEN r.state = 'processing' AND r.attempts >= r.max_attempts
                       THEN now() END,
    lease_token = NULL, worker_id = NULL, heartbeat_at = NULL
FROM expired
WHERE r.id = expired.id
RETURNING r.id, r.state;

-- name: start_async_requests
-- Leased pending requests go to their instance, in one statement (rows locked in id order);
-- those cancelled meanwhile or taken over are left out of the answer. Committed without waiting
-- for the WAL flush, as claims are.
-- $1 = ids, $2 = lease_tokens
WITH relaxed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), locked AS MATERIALIZED (
    SELECT id FROM async_requests WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
)
UPDATE async_requests r
SET state = 'processing', attempts = r.attempts + 1, started_at = now(), reason = NULL,
    heartbeat_at = now()
FROM unnest($1::uuid[], $2::uuid[]) AS held(id, lease_token), locked, relaxed
WHERE locked.id = held.id AND r.id = held.id AND r.lease_token = held.lease_token
  AND r.state = 'pending'
RETURNING r.id;

-- name: heartbeat_async_requests
-- Keep the leases of all the requests one control plane holds, in one statement (rows locked in
-- id order); those cancelled or taken over are left out of the answer. Committed without waiting
-- for the WAL flush, as claims are.
-- $1 = ids, $2 = lease_tokens
WITH relaxed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), locked AS MATERIALIZED (
    SELECT id FROM async_requests WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
)
UPDATE async_requests r SET heartbeat_at = now()
FROM unnest($1::uuid[], $2::uuid[]) AS held(id, lease_token), locked, relaxed
WHERE locked.id = held.id AND r.id = held.id AND r.lease_token = held.lease_token
  AND r.state IN ('pending', 'processing')
RETURNING r.id;

-- name: defer_async_request
-- Back to the queue with the reason it waits, not spending an attempt, due again in $4 s.
-- $1 = id, $2 = lease_token, $3 = reason, $4 = delay_s
UPDATE async_requests
SET state = 'pending', reason = $3,
    attempts = CASE WHEN state = 'processing' THEN greatest(attempts - 1, 0) ELSE attempts END,
    run_after = now() + make_interval(secs => $4::double precision),
    lease_token = NULL, worker_id = NULL, heartbeat_at = NULL
WHERE id = $1 AND lease_token = $2 AND state IN ('pending', 'processing')
RETURNING id;

-- name: finish_async_requests
-- Requests end, in one statement (rows locked in id order): 'success' with its result or
-- 'failed' with its reason ($1: a JSON array of {"id", "lease_token", "state", "result",
-- "reason"}); those cancelled or taken over are left out of the answer.
-- $1 = outcomes
WITH outcome AS MATERIALIZED (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS f(
        id uuid, lease_token uuid, state text, result jsonb, reason text)
    WHERE f.state IN ('success', 'failed')
), locked AS MATERIALIZED (
    SELECT id FROM async_requests WHERE id IN (SELECT id FROM outcome) ORDER BY id FOR UPDATE
)
UPDATE async_requests r
SET state = f.state, result = f.result, reason = f.reason, finished_at = now(),
    lease_token = NULL, heartbeat_at = NULL
FROM outcome f, locked
WHERE locked.id = f.id AND r.id = f.id AND r.lease_token = f.lease_token
  AND r.state IN ('pending', 'processing')
RETURNING r.id;

-- name: delete_finished_async_requests
-- Requests finished before the cutoff (the retention period).
-- $1 = cutoff
DELETE FROM async_requests WHERE finished_at < $1
RETURNING id;

-- uploads ------------------------------------------------------------------------------------

-- name: ensure_server_secret
-- The named secret, stored first as $2 when there is none (no row when another control plane
-- stored its own at the same moment: ask again).
-- $1 = name, $2 = candidate
WITH stored AS (
    INSERT INTO server_secrets (name, secret) VALUES ($1, $2)
    ON CONFLICT (name) DO NOTHING
    RETURNING secret
)
SELECT secret FROM stored
UNION ALL
SELECT secret FROM server_secrets WHERE name = $1
LIMIT 1;

-- name: insert_upload
-- A new open upload slot of one key, expiring in $4 s.
-- $1 = id, $2 = key_id, $3 = extension, $4 = expires_in_s
INSERT INTO uploads (id, key_id, extension, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4::double precision))
RETURNING *;

-- name: get_upload
-- One upload slot (the signature names its key).
-- $1 = id
SELECT * FROM uploads WHERE id = $1;

-- name: begin_upload_write
-- A PUT takes an open, unexpired slot; no row when it is being written, complete or expired.
-- $1 = id
UPDATE uploads SET state = 'writing', writing_at = now()
WHERE id = $1 AND state = 'open' AND expires_at > now()
RETURNING *;

-- name: complete_upload
-- The bytes are on disk: the slot is complete with its size.
-- $1 = id, $2 = size_bytes
UPDATE uploads SET state = 'complete', size_bytes = $2, completed_at = now()
WHERE id = $1 AND state = 'writing'
RETURNING *;

-- name: abandon_upload_write
-- A PUT that failed (too large, cut short, not audio) leaves the slot open for another try.
-- $1 = id
UPDATE uploads SET state = 'open', writing_at = NULL
WHERE id = $1 AND state = 'writing'
RETURNING id;

-- name: delete_stale_uploads
-- Uploads no request reads any more: made before the cutoff (the retention period), or never
-- completed and expired.
-- $1 = cutoff
DELETE FROM uploads u
WHERE NOT EXISTS (SELECT 1 FROM async_requests r WHERE r.upload_id = u.id)
  AND (u.created_at < $1 OR (u.state <> 'complete' AND u.expires_at < now()))
RETURNING id, extension;

-- webhooks -----------------------------------------------------------------------------------

-- name: ensure_webhook_secret
-- The key's webhook signing secret, stored first as $2 when it has none (no row on a race: ask
-- again).
-- $1 = key_id, $2 = candidate
WITH stored AS (
    INSERT INTO webhook_secrets (key_id, secret) VALUES ($1, $2)
    ON CONFLICT (key_id) DO NOTHING
    RETURNING secret
)
SELECT secret FROM stored
UNION ALL
SELECT secret FROM webhook_secrets WHERE key_id = $1
LIMIT 1;

-- name: claim_webhook_delivery
-- The most overdue pending delivery, with its key's secret; its next attempt is pushed $1 s
-- out first, so a control plane that dies while sending leaves it to be tried again then.
-- $1 = lease_s
UPDATE webhook_deliveries d
SET attempts = attempts + 1, next_at = now() + make_interval(secs => $1::double precision)
WHERE id = (
    SELECT id FROM webhook_deliveries
    WHERE state = 'pending' AND next_at <= now()
    ORDER BY next_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING d.*, (SELECT s.secret FROM webhook_secrets s WHERE s.key_id = d.key_id) AS secret;

-- name: record_webhook_attempt
-- What an attempt got: delivered, pending again in $5 s, or failed for good.
-- $1 = id, $2 = state, $3 = last_status, $4 = last_error, $5 = retry_in_s
UPDATE webhook_deliveries
SET state = $2, last_status = $3, last_error = $4,
    delivered_at = CASE WHEN $2 = 'delivered' THEN now() END,
    next_at = now() + make_interval(secs => $5::double precision)
WHERE id = $1
RETURNING id;

-- name: list_webhook_deliveries
-- The deliveries of one request of one key, oldest first.
-- $1 = request_id, $2 = key_id
SELECT * FROM webhook_deliveries WHERE request_id = $1 AND key_id = $2
ORDER BY created_at, id;

-- name: max_event_id
-- The newest lifecycle event's id, 0 when there is none (no $n).
SELECT coalesce(max(id), 0) FROM lifecycle_events;

-- name: events_after
-- Lifecycle events after a cursor, oldest first; a NULL owner means every event (admin), else
-- that key's instances and the shared job events.
-- $1 = after_id, $2 = owner_key_id, $3 = limit
SELECT * FROM lifecycle_events
WHERE id > $1 AND ($2::bigint IS NULL OR owner_key_id = $2 OR owner_key_id IS NULL)
ORDER BY id
LIMIT $3;

-- name: events_tail
-- The newest lifecycle events one viewer may see, oldest first (visibility as events_after).
-- $1 = owner_key_id, $2 = limit
SELECT * FROM (
    SELECT * FROM lifecycle_events
    WHERE $1::bigint IS NULL OR owner_key_id = $1 OR owner_key_id IS NULL
    ORDER BY id DESC
    LIMIT $2
) newest ORDER BY id;

-- name: events_by_ids
-- The lifecycle events a notification named.
-- $1 = ids
SELECT * FROM lifecycle_events WHERE id = ANY($1::bigint[]) ORDER BY id;

-- name: database_now
-- The database's clock: expiry is judged by it, never by a control plane's own clock (no $n).
SELECT now();

-- name: set_key_state
-- Disable or enable a key that is not revoked ($2 null: unchanged), and set or clear its expiry
-- ($3 true: set expires_at to $4, which may be null for never).
-- $1 = key_id, $2 = disabled, $3 = change_expiry, $4 = expires_at
UPDATE api_keys
SET disabled_at = CASE WHEN $2::boolean IS NULL THEN disabled_at
                       WHEN $2::boolean THEN coalesce(disabled_at, now()) ELSE NULL END,
    expires_at = CASE WHEN $3::boolean THEN $4::timestamptz ELSE expires_at END
WHERE id = $1 AND revoked_at IS NULL
RETURNING id, name, prefix, scope, created_at, revoked_at, disabled_at, expires_at,
          monthly_calls, requests_per_minute, concurrent_streams, max_apis,
          max_instances;

-- name: other_usable_admin_keys
-- How many admin keys other than $1 are usable now.
-- $1 = key_id
SELECT count(*) FROM api_keys
WHERE scope = 'admin' AND id <> $1 AND revoked_at IS NULL AND disabled_at IS NULL
  AND (expires_at IS NULL OR expires_at > now());

-- name: metrics_counts
-- What /metrics reports from the database: instances and jobs by state, evictions by reason
-- (no $n); rows are (family, label, n).
SELECT 'instances' AS family, state AS label, count(*) AS n FROM instances GROUP BY state
UNION ALL
SELECT 'jobs', state, count(*) FROM model_jobs GROUP BY state
UNION ALL
SELECT 'evictions', regexp_replace(reason, ' for .*$', ''), count(*)
FROM instance_events
WHERE to_state = 'STOPPING' AND reason LIKE 'evicted%'
GROUP BY 2;

-- handler APIs (issue 11) ----------------------------------------------------------------------

-- name: get_api
-- One API by owner and name, deleted ones included.
-- $1 = owner, $2 = name
SELECT * FROM apis WHERE owner = $1 AND name = $2;

-- name: get_api_by_model
-- The API whose catalog model this is (not deleted), if any.
-- $1 = model
SELECT * FROM apis WHERE model = $1 AND status <> 'deleted';

-- name: list_apis
-- APIs not deleted, of one owner or (NULL) of every owner.
-- $1 = owner
SELECT * FROM apis WHERE status <> 'deleted' AND ($1::text IS NULL OR owner = $1)
ORDER BY owner, name;

-- name: begin_api_version
-- Store a new version as the API's current one, status building; the API row is made on the
-- first deploy. Returns the API with its new version number.
-- $1 = owner, $2 = name, $3 = model, $4 = public
INSERT INTO apis (owner, name, model, public, version, status)
VALUES ($1, $2, $3, $4, 1, 'building')
ON CONFLICT (owner, name) DO UPDATE
SET version = apis.version + 1, status = 'building', reason = NULL, public = EXCLUDED.public,
    updated_at = now()
RETURNING *;

-- name: insert_api_version
-- Record where a version's files are.
-- $1 = owner, $2 = name, $3 = version, $4 = content_sha256, $5 = storage_path, $6 = spec_file,
-- $7 = requirements_sha256
INSERT INTO api_versions (owner, name, version, content_sha256, storage_path, spec_file,
                          requirements_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: get_api_version
-- One stored version of an owner's API.
-- $1 = owner, $2 = name, $3 = version
SELECT * FROM api_versions WHERE owner = $1 AND name = $2 AND version = $3;

-- name: set_api_status
-- Move the API's current version on, only while it is still that version (a newer deploy wins).
-- $1 = owner, $2 = name, $3 = version, $4 = status, $5 = reason
UPDATE apis SET status = $4, reason = $5, updated_at = now()
WHERE owner = $1 AND name = $2 AND version = $3 AND status <> 'deleted'
RETURNING *;

-- name: delete_api
-- Mark the API deleted and take its catalog model out of the list.
-- $1 = owner, $2 = name
WITH gone AS (
    UPDATE apis SET status = 'deleted', reason = NULL, updated_at = now()
    WHERE owner = $1 AND name = $2 AND status <> 'deleted'
    RETURNING *
), absent AS (
    UPDATE models SET present = false, updated_at = now()
    WHERE name = (SELECT model FROM gone)
)
SELECT * FROM gone;

-- name: upsert_api_model
-- The catalog row of an API's version: its files, unmeasured (the version is benchmarked anew).
-- $1 = model, $2 = source_path, $3 = param_bytes
WITH profiles AS (
    DELETE FROM model_profiles WHERE model = $1
), observations AS (
    DELETE FROM model_observations WHERE model = $1
)
INSERT INTO models (name, task, source_kind, source_path, param_bytes, present)
VALUES ($1, 'handler', 'apis', $2, $3, true)
ON CONFLICT (name) DO UPDATE
SET task = 'handler', source_kind = 'apis', source_path = EXCLUDED.source_path,
    gguf_file = NULL, param_bytes = EXCLUDED.param_bytes, required_ram_bytes = NULL,
    benchmarked_at = NULL, present = true, updated_at = now();

-- name: use_api_blob
-- A stored weights blob, by content hash, marked as asked for (not garbage for a while).
-- $1 = sha256
UPDATE api_blobs SET used_at = now() WHERE sha256 = $1 RETURNING size_bytes;

-- name: insert_api_blob
-- Record a stored blob (or its upload again); true when this call stored it first.
-- $1 = sha256, $2 = size_bytes
INSERT INTO api_blobs (sha256, size_bytes) VALUES ($1, $2)
ON CONFLICT (sha256) DO UPDATE SET used_at = now()
RETURNING xmax = 0;

-- name: unused_api_blobs
-- Blobs nobody asked for or uploaded in the last $1 seconds (garbage unless a version links them).
-- $1 = grace_s
SELECT sha256 FROM api_blobs WHERE used_at < now() - make_interval(secs => $1) ORDER BY sha256;

-- name: delete_api_blob
-- Forget a blob whose file is gone, unless it was asked for again in the last $2 seconds.
-- $1 = sha256, $2 = grace_s
DELETE FROM api_blobs WHERE sha256 = $1 AND used_at < now() - make_interval(secs => $2);

-- name: get_model_job
-- One model job by id (a deploy follows the job of its version).
-- $1 = job_id
SELECT * FROM model_jobs WHERE id = $1;

-- name: set_key_limits
-- Set the limits named in $2 (a JSON object of column: integer or null) of a key not revoked.
-- $1 = key_id, $2 = changes
UPDATE api_keys
SET monthly_calls = CASE WHEN $2::jsonb ? 'monthly_calls'
                         THEN ($2::jsonb ->> 'monthly_calls')::integer ELSE monthly_calls END,
    requests_per_minute = CASE WHEN $2::jsonb ? 'requests_per_minute'
                               THEN ($2::jsonb ->> 'requests_per_minute')::integer
                               ELSE requests_per_minute END,
    concurrent_streams = CASE WHEN $2::jsonb ? 'concurrent_streams'
                              THEN ($2::jsonb ->> 'concurrent_streams')::integer
                              ELSE concurrent_streams END,
    max_apis = CASE WHEN $2::jsonb ? 'max_apis'
                    THEN ($2::jsonb ->> 'max_apis')::integer ELSE max_apis END,
    max_instances = CASE WHEN $2::jsonb ? 'max_instances'
                         THEN ($2::jsonb ->> 'max_instances')::integer ELSE max_instances END
WHERE id = $1 AND revoked_at IS NULL
RETURNING id, name, prefix, scope, created_at, revoked_at, disabled_at, expires_at,
          monthly_calls, requests_per_minute, concurrent_streams, max_apis,
          max_instances;

-- name: reserve_calls
-- Reserve up to $3 calls of key $1's quota of $4 calls for month $2, at most what is left; the
-- answer is how many were granted (no row: none left). One conditional statement, so control
-- planes racing for a key's last calls are granted exactly what is left between them.
-- $1 = key_id, $2 = month, $3 = wanted, $4 = monthly_limit
INSERT INTO key_usage AS u (key_id, month, held, last_grant)
VALUES ($1, $2::date, least($3::bigint, $4::bigint), least($3::bigint, $4::bigint))
ON CONFLICT (key_id, month) DO UPDATE
SET held = u.held + least($3::bigint, $4::bigint - u.calls - u.held),
    last_grant = least($3::bigint, $4::bigint - u.calls - u.held)
WHERE u.calls + u.held < $4::bigint
RETURNING last_grant, calls + held AS used;

-- name: record_calls
-- Add $3 served calls to key $1's month $2, and release $4 calls it held (served or given back).
-- $1 = key_id, $2 = month, $3 = calls, $4 = released
INSERT INTO key_usage AS u (key_id, month, calls)
VALUES ($1, $2::date, $3::bigint)
ON CONFLICT (key_id, month) DO UPDATE
SET calls = u.calls + $3::bigint, held = greatest(0, u.held - $4::bigint);

-- name: usage_for_month
-- Calls per key in month $1, every key that is not revoked or has calls that month; $2 null:
-- all keys, else that key only.
-- $1 = month, $2 = key_id
SELECT k.id, k.name, k.scope, k.revoked_at, k.monthly_calls, coalesce(u.calls, 0) AS calls
FROM api_keys k
LEFT JOIN key_usage u ON u.key_id = k.id AND u.month = $1
WHERE ($2::bigint IS NULL OR k.id = $2)
  AND (k.revoked_at IS NULL OR u.calls > 0)
ORDER BY k.id;

-- name: count_owned_instances
-- How many live instances (STARTING, RUNNING, STOPPING) the key $1 loaded, other than of $2.
-- $1 = owner_key_id, $2 = model
SELECT count(*) FROM instances
WHERE owner_key_id = $1 AND model <> $2 AND state IN ('STARTING', 'RUNNING', 'STOPPING');

-- name: count_owned_apis
-- How many APIs (not deleted) the owner $1 has, other than $2 (a new version is not a new API).
-- $1 = owner, $2 = name
SELECT count(*) FROM apis WHERE owner = $1 AND name <> $2 AND status <> 'deleted';
