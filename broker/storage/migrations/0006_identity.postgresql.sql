-- Workload identity, PostgreSQL flavour: attestation JWTs already used (replay cache), keyed by
-- the issuer and the token's jti (or a hash of the token when it has none), kept until the
-- token's own expiry and pruned after it.

CREATE TABLE attestation_jwt_uses (
    issuer     text        NOT NULL,
    jti        text        NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NOT NULL,
    PRIMARY KEY (issuer, jti)
);

CREATE INDEX attestation_jwt_uses_expiry ON attestation_jwt_uses (expires_at);
