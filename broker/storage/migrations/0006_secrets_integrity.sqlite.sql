-- Secret metadata integrity: an HMAC (key in the key backend) over every metadata column of a
-- secret, written with every metadata change and verified on every read. NULL only for rows
-- written before this migration, until the broker computes their MAC once at start (see
-- broker.secrets.SecretService.seal_legacy); after that a NULL MAC is a tampered row.
ALTER TABLE secrets ADD COLUMN meta_mac BLOB;
