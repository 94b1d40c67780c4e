-- Wrapped static secrets, PostgreSQL flavour. Values live only in `secret_versions.sealed`: a
-- SealedBlob (AES-256-GCM ciphertext under a per-version data key, wrapped by the tenant's KEK
-- in the key backend). Metadata columns are nullable on purpose: a record missing any of them
-- is refused for distribution, not hidden.

CREATE TABLE secrets (
    tenant            text        NOT NULL,
    ref               text        NOT NULL,
    service           text,
    environment       text,
    owner             text,
    classification    text,
    rotation_period_s bigint,
    last_rotated      timestamptz,
    current_version   integer     NOT NULL CHECK (current_version >= 1),
    state             text        NOT NULL
        CHECK (state IN ('active', 'revoked', 'deleted', 'destroyed')),
    created_at        timestamptz NOT NULL,
    revoked_at        timestamptz,
    deleted_at        timestamptz,
    PRIMARY KEY (tenant, ref)
);

CREATE TABLE secret_versions (
    tenant     text        NOT NULL,
    ref        text        NOT NULL,
    version    integer     NOT NULL CHECK (version >= 1),
    kek_label  text,
    sealed     bytea,
    created_at timestamptz NOT NULL,
    retire_at  timestamptz,
    revoked_at timestamptz,
    PRIMARY KEY (tenant, ref, version),
    FOREIGN KEY (tenant, ref) REFERENCES secrets (tenant, ref)
);

CREATE INDEX secret_versions_kek ON secret_versions (kek_label);
CREATE INDEX secret_versions_retire ON secret_versions (retire_at) WHERE revoked_at IS NULL;
