-- The control plane launching a STARTING instance renews this while it works on it (preparing
-- the model's files, starting the process, waiting for health), so other control planes can
-- tell a launch under way from one whose launcher died.
ALTER TABLE instances ADD COLUMN launch_seen_at timestamptz;
