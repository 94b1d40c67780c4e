-- Secret metadata integrity: an HMAC (key in the key backend) over every metadata column of a
-- secret (`meta_mac`) and over the lifecycle columns of each version (`state_mac`: version,
-- created, retire and revoke times), written with every change and verified on every read.
-- NULL only for rows written before this migration, until the broker computes their MACs once
-- at start (broker.secrets.SecretService.start); after that a NULL MAC is a tampered row.
ALTER TABLE secrets ADD COLUMN meta_mac BLOB;
ALTER TABLE secret_versions ADD COLUMN state_mac BLOB;
