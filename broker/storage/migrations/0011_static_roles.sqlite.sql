-- Static database roles (issue 12): users that already exist on a target database, whose
-- password the broker rotates on a period. The current password is stored only sealed; a
-- rotation writes its intent (the new password, sealed) before touching the database, and the
-- intent is rolled forward after a crash.

CREATE TABLE db_static_roles (
    name                TEXT    PRIMARY KEY,
    connection          TEXT    NOT NULL REFERENCES db_connections (name),
    username            TEXT    NOT NULL,
    owner               TEXT    NOT NULL,
    tenant              TEXT    NOT NULL,
    environment         TEXT    NOT NULL,
    rotation_period     INTEGER NOT NULL,
    rotation_statements TEXT,
    sealed_password     BLOB,
    kek_label           TEXT,
    version             INTEGER NOT NULL DEFAULT 0,
    rotated_at          INTEGER,
    next_rotation_at    INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    UNIQUE (connection, username)
) STRICT;

CREATE INDEX db_static_roles_due ON db_static_roles (next_rotation_at);
CREATE INDEX db_static_roles_owner ON db_static_roles (owner);

-- At most one rotation in flight per role: the new password (sealed) and its version.
CREATE TABLE db_static_intents (
    role            TEXT    PRIMARY KEY REFERENCES db_static_roles (name),
    sealed_password BLOB   NOT NULL,
    kek_label       TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    started_at      INTEGER NOT NULL
) STRICT;

-- Dynamic roles carry a data classification and a rotation period like secrets, so the prod +
-- pii two-person rule applies to `db creds` too.
ALTER TABLE db_roles ADD COLUMN classification TEXT NOT NULL DEFAULT '';
ALTER TABLE db_roles ADD COLUMN rotation_period INTEGER;
