-- Async inference inputs and callbacks: upload slots signed with a server secret, the upload an
-- async request reads, and webhook deliveries recorded (and retried) in the database.

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
