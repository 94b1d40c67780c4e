-- Reserved for a feature; its tables are added here (both dialects, or split into
-- 0002_workload_identity.sqlite.sql and 0002_workload_identity.postgresql.sql).
SELECT 1;
