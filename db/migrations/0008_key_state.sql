-- Keys can be disabled and enabled again (revoking is for good), and carry an optional expiry.
ALTER TABLE api_keys
    ADD COLUMN disabled_at timestamptz,
    ADD COLUMN expires_at  timestamptz;
