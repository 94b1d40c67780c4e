-- Reserved for a feature; its tables are added here (both dialects, or split into
-- 0004_secrets.sqlite.sql and 0004_secrets.postgresql.sql).
SELECT 1;
