-- Redeploying a handler API rolls its instance over (issue 11): the new version's instance
-- starts beside the previous one and takes its calls once RUNNING, then the previous one stops.
-- Each instance records the API version whose files it runs (NULL: a catalog model, which has no
-- versions), and one live instance is allowed per model and version, not per model.
ALTER TABLE instances ADD COLUMN api_version integer CHECK (api_version >= 1);

UPDATE instances i SET api_version = v.version
FROM models m, apis a, api_versions v
WHERE i.state IN ('STARTING', 'RUNNING', 'STOPPING')
  AND m.name = i.model AND m.source_kind = 'apis'
  AND a.model = i.model AND v.owner = a.owner AND v.name = a.name
  AND v.storage_path = m.source_path;

DROP INDEX instances_one_live_per_model;
CREATE UNIQUE INDEX instances_one_live_per_model ON instances (model, (coalesce(api_version, 0)))
    WHERE state IN ('STARTING', 'RUNNING', 'STOPPING');
