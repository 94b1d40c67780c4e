-- KMS keys (PostgreSQL flavour): named keys per tenant (issue 16) and their versions. A version's
-- key material lives only in the key backend under `label`; this table holds its metadata.

CREATE TABLE kms_keys (
    tenant            TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    purpose           TEXT    NOT NULL,
    key_type          TEXT    NOT NULL,
    owner             TEXT    NOT NULL,
    environment       TEXT    NOT NULL,
    classification    TEXT    NOT NULL,
    rotation_period_s BIGINT  NOT NULL,
    state             TEXT    NOT NULL,
    current_version   BIGINT  NOT NULL,
    created_at        timestamptz NOT NULL,
    last_rotated      timestamptz NOT NULL,
    destroy_after     timestamptz,
    -- HMAC-SHA256 (in the key backend) over every column above: a row altered outside the
    -- broker (its owner, state, current version, ...) is refused.
    mac               BYTEA,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE kms_key_versions (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    version      BIGINT  NOT NULL,
    label        TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    created_at   timestamptz NOT NULL,
    destroyed_at timestamptz,
    PRIMARY KEY (tenant, name, version)
);
