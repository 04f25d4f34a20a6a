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
