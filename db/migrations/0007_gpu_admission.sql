-- Admission by device kind: an instance on a GPU holds VRAM there (reserved_bytes) and host
-- memory beside it (host_reserved_bytes; 0 for an instance on the host, whose reserved_bytes
-- are host memory already).
ALTER TABLE instances
    ADD COLUMN host_reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (host_reserved_bytes >= 0);
