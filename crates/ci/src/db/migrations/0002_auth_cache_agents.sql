-- Cached failures, one evaluation at a time per specification, and agent
-- sessions that outlive a restart of kiln-ci.

-- Derivations whose build failed permanently (Hydra's FailedPaths): a new
-- evaluation does not build them again; its build fails at once, pointing
-- to the build that failed. A restart of either build removes the row.
CREATE TABLE failed_derivations (
    drv_path TEXT PRIMARY KEY,
    build_id BIGINT NOT NULL,
    failed_at BIGINT NOT NULL
);

-- The earlier build whose failure this one repeats without building.
ALTER TABLE builds ADD COLUMN cached_failure_of BIGINT;

-- At most one evaluation of a specification runs: the database refuses a
-- second, whoever starts it (API, CLI, timer). Evaluations left started by
-- an older kiln-ci beside a newer one are aborted first.
UPDATE evaluations SET status = 'aborted', error = 'superseded by a later evaluation of the same specification'
    WHERE status = 'started' AND id NOT IN
    (SELECT MAX(id) FROM evaluations WHERE status = 'started' GROUP BY specification);
CREATE UNIQUE INDEX evaluations_one_started ON evaluations(specification) WHERE status = 'started';

-- Tasks handed to build agents and not answered yet. A build in a session
-- stays started across a restart of kiln-ci, so that the agent's result is
-- still accepted.
CREATE TABLE agent_sessions (
    session TEXT PRIMARY KEY,
    build_id BIGINT NOT NULL,
    agent TEXT NOT NULL,
    public_key TEXT NOT NULL,
    challenge TEXT NOT NULL,
    dir TEXT NOT NULL,
    handed_out BIGINT NOT NULL
);
CREATE INDEX agent_sessions_build ON agent_sessions(build_id);
