-- Reserved for a feature; its tables are added here (both dialects, or split into
-- 0005_grants_approvals.sqlite.sql and 0005_grants_approvals.postgresql.sql).
SELECT 1;
