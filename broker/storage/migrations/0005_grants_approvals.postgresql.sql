-- Just-in-time grants, two-party approvals and break-glass credentials (PostgreSQL flavour).
-- Timestamps are timestamptz. Rows are never deleted: revocation,
-- approval and use are recorded in place, so the history stays next to the audit ledger.

CREATE TABLE access_grants (
    id            TEXT    PRIMARY KEY,
    grantee       TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    resource      TEXT    NOT NULL,
    justification TEXT    NOT NULL,
    created_by    TEXT    NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    revoked_by    TEXT
);
CREATE INDEX access_grants_expiry ON access_grants (expires_at);

CREATE TABLE access_approvals (
    id            TEXT    PRIMARY KEY,
    requester     TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    resource      TEXT    NOT NULL,
    justification TEXT    NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    approved_by   TEXT,
    approved_at   timestamptz,
    used_at       timestamptz,
    CHECK (approved_by IS NULL OR approved_by <> requester)
);
CREATE INDEX access_approvals_expiry ON access_approvals (expires_at);

CREATE TABLE access_breakglass (
    id          TEXT    PRIMARY KEY,
    operator    TEXT    NOT NULL,
    approval_id TEXT    NOT NULL UNIQUE,
    spiffe_id   TEXT    NOT NULL UNIQUE,
    action      TEXT    NOT NULL,
    resource    TEXT    NOT NULL,
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX access_breakglass_expiry ON access_breakglass (expires_at);
