-- KMS keys (SQLite flavour): named keys per tenant (issue 16) and their versions. A version's
-- key material lives only in the key backend under `label`; this table holds its metadata.
-- Timestamps are INTEGER microseconds, UTC.

CREATE TABLE kms_keys (
    tenant            TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    purpose           TEXT    NOT NULL,
    key_type          TEXT    NOT NULL,
    owner             TEXT    NOT NULL,
    environment       TEXT    NOT NULL,
    classification    TEXT    NOT NULL,
    rotation_period_s INTEGER NOT NULL,
    state             TEXT    NOT NULL,
    current_version   INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    last_rotated      INTEGER NOT NULL,
    destroy_after     INTEGER,
    -- HMAC-SHA256 (in the key backend) over every column above: a row altered outside the
    -- broker (its owner, state, current version, ...) is refused.
    mac               BLOB,
    PRIMARY KEY (tenant, name)
) STRICT;

CREATE TABLE kms_key_versions (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    label        TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    destroyed_at INTEGER,
    PRIMARY KEY (tenant, name, version)
) STRICT;
