-- The async queue is claimed in batches: the claim index holds only claimable requests (queued,
-- no lease), so a claim no longer walks past the ones other workers hold; and a submit counts
-- its key's live requests (the burst bound, the fair-share rank) from an index of those alone,
-- not from all the key's requests of the retention period.
DROP INDEX async_requests_claimable;
CREATE INDEX async_requests_claimable ON async_requests (key_rank, created_at)
    WHERE state IN ('accepted', 'pending') AND lease_token IS NULL;
CREATE INDEX async_requests_live_by_key ON async_requests (key_id, key_rank)
    WHERE state IN ('accepted', 'pending', 'processing');
