-- Reserved for a feature; its tables are added here (both dialects, or split into
-- 0003_database_credentials.sqlite.sql and 0003_database_credentials.postgresql.sql).
SELECT 1;
