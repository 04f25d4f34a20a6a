-- Lifecycle events for GET /events: instance transitions (evictions told apart) and model job
-- transitions, copied by triggers from the history the control plane already writes, numbered
-- for Last-Event-ID replay, and announced on channel mlcp_events to every control plane.
CREATE TABLE lifecycle_events (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('instance', 'eviction', 'job')),
    model         text NOT NULL,
    instance_id   bigint,
    job_id        bigint,
    -- The key that loaded the instance; NULL for job events (the catalog is shared).
    owner_key_id  bigint,
    from_state    text,
    to_state      text NOT NULL,
    reason        text,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lifecycle_events_by_owner ON lifecycle_events (owner_key_id, id);

CREATE FUNCTION lifecycle_events_from_instance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO lifecycle_events
        (kind, model, instance_id, owner_key_id, from_state, to_state, reason, at)
    SELECT CASE WHEN NEW.reason LIKE 'evicted%' THEN 'eviction' ELSE 'instance' END,
           i.model, i.id, i.owner_key_id, NEW.from_state, NEW.to_state, NEW.reason, NEW.at
    FROM instances i WHERE i.id = NEW.instance_id
    RETURNING id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('mlcp_events', new_id::text);
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER instance_events_publish
    AFTER INSERT ON instance_events
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_instance();

-- A new instance is a transition from nothing (its creation writes no instance_events row).
CREATE FUNCTION lifecycle_events_from_new_instance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO lifecycle_events (kind, model, instance_id, owner_key_id, to_state, reason, at)
    VALUES ('instance', NEW.model, NEW.id, NEW.owner_key_id, NEW.state, NEW.reason, NEW.created_at)
    RETURNING id INTO new_id;
    PERFORM pg_notify('mlcp_events', new_id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER instances_publish_insert
    AFTER INSERT ON instances
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_new_instance();

CREATE FUNCTION lifecycle_events_from_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
    old_state text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        old_state := OLD.state;
    END IF;
    INSERT INTO lifecycle_events (kind, model, job_id, from_state, to_state, reason)
    VALUES ('job', NEW.model, NEW.id, old_state, NEW.state, NEW.reason)
    RETURNING id INTO new_id;
    PERFORM pg_notify('mlcp_events', new_id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER model_jobs_publish_insert
    AFTER INSERT ON model_jobs
    FOR EACH ROW EXECUTE FUNCTION lifecycle_events_from_job();
CREATE TRIGGER model_jobs_publish_update
    AFTER UPDATE OF state ON model_jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION lifecycle_events_from_job();
