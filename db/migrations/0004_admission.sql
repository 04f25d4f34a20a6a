-- Memory admission: where each instance runs and how much memory it holds until really gone.
ALTER TABLE instances
    ADD COLUMN device         text NOT NULL DEFAULT 'cpu',
    ADD COLUMN reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    ADD COLUMN rejected       bigint NOT NULL DEFAULT 0;

-- A load asked with "benchmark": true waits here until its model is measured.
CREATE TABLE pending_loads (
    model          text PRIMARY KEY REFERENCES models (name),
    concurrency    integer NOT NULL CHECK (concurrency BETWEEN 1 AND 64),
    expiration_s   integer NOT NULL CHECK (expiration_s BETWEEN 1 AND 2592000),
    owner_key_id   bigint REFERENCES api_keys (id),
    requested_at   timestamptz NOT NULL DEFAULT now()
);
