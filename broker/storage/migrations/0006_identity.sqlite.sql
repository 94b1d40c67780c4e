-- Workload identity, SQLite flavour: attestation JWTs already used (replay cache), keyed by the
-- issuer and the token's jti (or a hash of the token when it has none), kept until the token's
-- own expiry and pruned after it.

CREATE TABLE attestation_jwt_uses (
    issuer     TEXT    NOT NULL,
    jti        TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER NOT NULL,
    PRIMARY KEY (issuer, jti)
) STRICT;

CREATE INDEX attestation_jwt_uses_expiry ON attestation_jwt_uses (expires_at);
