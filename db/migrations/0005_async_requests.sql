-- Async inference requests (submit, poll, cancel): a durable queue claimed with leases.

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

CREATE INDEX async_requests_claimable ON async_requests (key_rank, created_at)
    WHERE state IN ('accepted', 'pending');
CREATE INDEX async_requests_leased ON async_requests (heartbeat_at)
    WHERE state IN ('pending', 'processing') AND lease_token IS NOT NULL;
CREATE INDEX async_requests_by_key ON async_requests (key_id, created_at DESC, id DESC);
CREATE INDEX async_requests_finished ON async_requests (finished_at)
    WHERE finished_at IS NOT NULL;
