-- Wrapped static secrets, SQLite flavour (STRICT; timestamps are INTEGER microseconds, UTC).
-- Values live only in `secret_versions.sealed`: a SealedBlob (AES-256-GCM ciphertext under a
-- per-version data key, wrapped by the tenant's KEK in the key backend). Metadata columns are
-- nullable on purpose: a record missing any of them is refused for distribution, not hidden.

CREATE TABLE secrets (
    tenant            TEXT    NOT NULL,
    ref               TEXT    NOT NULL,
    service           TEXT,
    environment       TEXT,
    owner             TEXT,
    classification    TEXT,
    rotation_period_s INTEGER,
    last_rotated      INTEGER,
    current_version   INTEGER NOT NULL CHECK (current_version >= 1),
    state             TEXT    NOT NULL
        CHECK (state IN ('active', 'revoked', 'deleted', 'destroyed')),
    created_at        INTEGER NOT NULL,
    revoked_at        INTEGER,
    deleted_at        INTEGER,
    PRIMARY KEY (tenant, ref)
) STRICT;

CREATE TABLE secret_versions (
    tenant     TEXT    NOT NULL,
    ref        TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    kek_label  TEXT,
    sealed     BLOB,
    created_at INTEGER NOT NULL,
    retire_at  INTEGER,
    revoked_at INTEGER,
    PRIMARY KEY (tenant, ref, version),
    FOREIGN KEY (tenant, ref) REFERENCES secrets (tenant, ref)
) STRICT;

CREATE INDEX secret_versions_kek ON secret_versions (kek_label);
CREATE INDEX secret_versions_retire ON secret_versions (retire_at) WHERE revoked_at IS NULL;
