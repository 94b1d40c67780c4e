-- Staged rollout of a static database role (issue 12): the pair of login users of a role (the
-- one it was added with and the second one the broker creates for rollouts) and, while a
-- rollout runs, the user that gets the new password and that password, sealed (written before
-- the database is touched, so a crash is rolled forward or back).

CREATE TABLE db_static_rollouts (
    name            TEXT    PRIMARY KEY,
    first_user      TEXT    NOT NULL,
    second_user     TEXT    NOT NULL,
    target_user     TEXT    NOT NULL DEFAULT '',
    rollout_id      TEXT    NOT NULL DEFAULT '',
    version         INTEGER NOT NULL DEFAULT 0,
    sealed_password bytea,
    kek_label       TEXT
);
