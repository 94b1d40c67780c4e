-- Operator logins (PostgreSQL flavour): one row per operator certificate issued by `broker login`
-- (its serial, never the ID token), and the ID tokens already used (by nonce or token hash,
-- until they expire) so that no token logs in twice.

CREATE TABLE operator_sessions (
    serial     TEXT        PRIMARY KEY,
    subject    TEXT        NOT NULL,
    spiffe_id  TEXT        NOT NULL,
    issuer     TEXT        NOT NULL,
    roles      TEXT        NOT NULL,
    amr        TEXT        NOT NULL,
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX operator_sessions_subject ON operator_sessions (subject);
CREATE INDEX operator_sessions_expiry ON operator_sessions (expires_at);

CREATE TABLE operator_used_tokens (
    key        TEXT        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
