-- Encryption at rest (S15): each tenant's data key for its stored files, wrapped
-- (XChaCha20-Poly1305) by the installation's master key, which never enters the database
-- (nor its backups). A file names the key it was sealed with (`key_id`), so keys can be
-- added by version later without rewriting old files. Deleting a tenant's rows makes every
-- file sealed under them unreadable, stray copies and object-store replicas included
-- (crypto-shredding); the database's own backups keep the rows until they expire.
-- `master_key_id` is a fingerprint of the master key that wrapped the row, not the key:
-- it lets a start with the wrong master key say so instead of failing on every file.
CREATE TABLE tenant_keys (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    version INTEGER NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    wrapped TEXT NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
