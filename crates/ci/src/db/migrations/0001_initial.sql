-- kiln-ci's schema. Portable SQL for SQLite and PostgreSQL: integers are
-- BIGINT, booleans are BIGINT 0/1, lists and maps are JSON text, and
-- {{id}} stands for the dialect's auto-increment primary key.

CREATE TABLE specifications (
    name TEXT PRIMARY KEY,
    inputs TEXT NOT NULL,
    eval_input TEXT NOT NULL,
    evaluator TEXT NOT NULL,
    systems TEXT NOT NULL,
    priority BIGINT NOT NULL,
    period_secs BIGINT NOT NULL,
    build_targets TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE evaluations (
    id {{id}},
    specification TEXT NOT NULL REFERENCES specifications(name) ON DELETE CASCADE,
    status TEXT NOT NULL,
    checkouts TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    evaluated_at BIGINT,
    finished_at BIGINT,
    log_path TEXT,
    error TEXT
);
CREATE INDEX evaluations_specification ON evaluations(specification, id);

CREATE TABLE evaluation_errors (
    evaluation_id BIGINT NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    attr TEXT NOT NULL,
    error TEXT NOT NULL
);
CREATE INDEX evaluation_errors_evaluation ON evaluation_errors(evaluation_id);

CREATE TABLE builds (
    id {{id}},
    evaluation_id BIGINT NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    specification TEXT NOT NULL,
    job TEXT NOT NULL,
    drv_path TEXT NOT NULL,
    system TEXT NOT NULL,
    outputs TEXT NOT NULL,
    status TEXT NOT NULL,
    priority BIGINT NOT NULL,
    required_features TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    stopped_at BIGINT,
    machine TEXT,
    log_path TEXT,
    attempts BIGINT NOT NULL,
    retry_after BIGINT,
    error TEXT
);
CREATE INDEX builds_evaluation ON builds(evaluation_id);
CREATE INDEX builds_status ON builds(status, priority);
CREATE INDEX builds_drv_path ON builds(drv_path);

CREATE TABLE build_dependencies (
    build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    depends_on BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    PRIMARY KEY (build_id, depends_on)
);
CREATE INDEX build_dependencies_reverse ON build_dependencies(depends_on);

CREATE TABLE agents (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    machines TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT
);

CREATE TABLE output_roots (
    path TEXT PRIMARY KEY,
    build_id BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX output_roots_expiry ON output_roots(expires_at);
