-- Staged rollouts of a new secret version (issue 12): one row per rollout, one row per consumer
-- (a workload identity that read the secret or reported on it during the rollout). At most one
-- rollout per secret is unfinished at a time.

CREATE TABLE rollouts (
    id              TEXT    PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    ref             TEXT    NOT NULL,
    from_version    INTEGER NOT NULL,
    to_version      INTEGER,
    state           TEXT    NOT NULL,
    stages          TEXT    NOT NULL,
    stage           INTEGER NOT NULL,
    stage_opened_at INTEGER NOT NULL,
    bake_seconds    INTEGER NOT NULL,
    max_failures    INTEGER NOT NULL,
    failures        INTEGER NOT NULL DEFAULT 0,
    health_check    TEXT    NOT NULL DEFAULT '',
    check_passed    INTEGER,
    checked_at      INTEGER,
    check_detail    TEXT    NOT NULL DEFAULT '',
    started_at      INTEGER NOT NULL,
    deadline        INTEGER NOT NULL,
    finished_at     INTEGER,
    reason          TEXT    NOT NULL DEFAULT '',
    started_by      TEXT    NOT NULL,
    ticket          TEXT    NOT NULL,
    approver        TEXT    NOT NULL DEFAULT ''
) STRICT;

CREATE UNIQUE INDEX rollouts_one_active ON rollouts (tenant, ref)
    WHERE state IN ('pending', 'running', 'completing', 'rolling-back', 'aborting');
CREATE INDEX rollouts_by_ref ON rollouts (tenant, ref, started_at);
CREATE INDEX rollouts_by_state ON rollouts (state);

CREATE TABLE rollout_consumers (
    rollout_id       TEXT    NOT NULL REFERENCES rollouts (id),
    identity         TEXT    NOT NULL,
    stage            INTEGER NOT NULL,
    served_version   INTEGER,
    read_at          INTEGER,
    reported_version INTEGER,
    healthy          INTEGER,
    detail           TEXT    NOT NULL DEFAULT '',
    reported_at      INTEGER,
    PRIMARY KEY (rollout_id, identity)
) STRICT;
