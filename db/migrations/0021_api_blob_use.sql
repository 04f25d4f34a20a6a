-- A weight blob no version links is removed once nobody has asked for it (HEAD) or uploaded it
-- (PUT) for MLCP_BLOB_GRACE_S: `used_at` is when that last happened.
ALTER TABLE api_blobs ADD COLUMN used_at timestamptz NOT NULL DEFAULT now();
