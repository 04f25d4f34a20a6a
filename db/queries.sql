-- Named queries: each block starts with "-- name: <name>" and uses $1..$n parameters.
-- db/queries.py wraps every block in one typed function.

-- name: insert_key
INSERT INTO api_keys (name, prefix, key_hash, scope)
VALUES ($1, $2, $3, $4)
RETURNING id, name, prefix, scope, created_at, revoked_at;

-- name: get_active_key_by_hash
SELECT id, name, prefix, key_hash, scope
FROM api_keys
WHERE key_hash = $1 AND revoked_at IS NULL;

-- name: list_keys
SELECT id, name, prefix, scope, created_at, revoked_at
FROM api_keys
ORDER BY id;

-- name: revoke_key
UPDATE api_keys SET revoked_at = now()
WHERE id = $1 AND revoked_at IS NULL
RETURNING id, name, prefix, scope, created_at, revoked_at;

-- name: count_active_admin_keys
SELECT count(*) FROM api_keys WHERE scope = 'admin' AND revoked_at IS NULL;

-- name: upsert_discovered_model
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
WHERE (models.task, models.source_kind, models.source_path, models.gguf_file,
       models.param_bytes, models.present)
      IS DISTINCT FROM
      (EXCLUDED.task, EXCLUDED.source_kind, EXCLUDED.source_path, EXCLUDED.gguf_file,
       EXCLUDED.param_bytes, true);

-- name: mark_models_absent_except
UPDATE models SET present = false, updated_at = now()
WHERE present AND source_kind <> 'hub' AND NOT (name = ANY($1::text[]));

-- name: list_models
SELECT name, task, source_kind, source_path, gguf_file, param_bytes, required_ram_bytes,
       benchmarked_at, present
FROM models
WHERE present
ORDER BY name;

-- name: get_model
SELECT name, task, source_kind, source_path, gguf_file, param_bytes, required_ram_bytes,
       benchmarked_at, present
FROM models
WHERE name = $1;
