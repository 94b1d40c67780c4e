-- Indexes for the periodic jobs, so that their cost does not grow with the table (issue 18,
-- cost as the work grows: measured with `python -m loadtests preload`, 100,000 live leases).
-- The reaper's `due_leases` also returns irrevocable leases (they are retried), which the
-- partial index of 0003 leaves out, so every reaper round scanned and sorted the whole table;
-- the index on every row's due_at serves it and the oldest-due figure of `lease_stats`.
DROP INDEX db_leases_due;
CREATE INDEX db_leases_due ON db_leases (due_at);
-- `irrevocable_count`, every reaper round (a metric): only the irrevocable rows.
CREATE INDEX db_leases_irrevocable ON db_leases (state) WHERE state = 'irrevocable';
-- The secret janitor's `destroy_deleted`: only the deleted secrets.
CREATE INDEX secrets_deleted ON secrets (deleted_at) WHERE state = 'deleted';
