-- Workload identity, PostgreSQL flavour: join tokens (hashed), JWT attestors, registration
-- entries and the SVID denylist.

CREATE TABLE join_tokens (
    token_hash bytea       PRIMARY KEY,
    spiffe_id  text        NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE TABLE attestors (
    name       text        PRIMARY KEY,
    issuer     text        NOT NULL UNIQUE,
    audience   text        NOT NULL,
    jwks       text        NOT NULL,
    template   text        NOT NULL,
    algorithms text        NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE registration_entries (
    id         text        PRIMARY KEY,
    spiffe_id  text        NOT NULL,
    parent_id  text        NOT NULL,
    selectors  text        NOT NULL,
    x509_ttl   bigint      NOT NULL,
    jwt_ttl    bigint      NOT NULL,
    dns_names  text        NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE INDEX registration_entries_parent ON registration_entries (parent_id);

CREATE TABLE svid_denylist (
    kind       text        NOT NULL CHECK (kind IN ('spiffe_id', 'serial')),
    value      text        NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (kind, value)
);
