-- Keys may have the `metrics` scope: they may scrape /metrics and nothing else.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scope_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scope_check
    CHECK (scope IN ('admin', 'user', 'metrics'));
