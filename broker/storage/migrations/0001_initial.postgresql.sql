-- Initial schema, PostgreSQL flavour. Timestamps are timestamptz, bytes are bytea.

CREATE TABLE schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL
);

-- The CA journal: the root and each generation of the issuing CA.
CREATE TABLE authorities (
    id            text        PRIMARY KEY,
    kind          text        NOT NULL CHECK (kind IN ('root', 'issuing')),
    generation    integer     NOT NULL,
    state         text        NOT NULL CHECK (state IN ('prepared', 'active', 'retired', 'expired')),
    key_label     text        NOT NULL,
    cert_der      bytea       NOT NULL,
    jwt_key_label text,
    jwt_kid       text,
    created_at    timestamptz NOT NULL,
    not_before    timestamptz NOT NULL,
    not_after     timestamptz NOT NULL,
    activated_at  timestamptz,
    retired_at    timestamptz,
    UNIQUE (kind, generation)
);

-- Versioned policy documents ("ca" for the CA policy), append-only.
CREATE TABLE policies (
    name       text        NOT NULL,
    version    integer     NOT NULL CHECK (version >= 1),
    document   text        NOT NULL,
    author     text        NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (name, version)
);

-- The tamper-evident audit ledger: a hash chain, one row per event, seq 1, 2, 3, ...
CREATE TABLE audit (
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    event      text   NOT NULL,
    prev_hash  bytea  NOT NULL,
    entry_hash bytea  NOT NULL,
    mac        bytea  NOT NULL
);

-- Append-only: rows are never changed or removed through SQL (tampering by someone with write
-- access is caught by the hash chain and MACs; this stops accidents). A retention job, when it
-- comes, replaces these in a migration.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit ledger is append-only';
END;
$$;

CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();

CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE counters (
    name  text   PRIMARY KEY,
    value bigint NOT NULL
);

-- Named leader leases for background jobs (CA rotation, lease reaper, retention).
CREATE TABLE leases_lock (
    name       text        PRIMARY KEY,
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL
);
