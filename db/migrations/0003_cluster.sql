-- The deployment's identity: instances are labelled with it, so two mlcp deployments on one host
-- (or two test databases) never adopt or remove each other's instances.
CREATE TABLE cluster (
    id          text PRIMARY KEY,
    singleton   boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cluster (id) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 12));
