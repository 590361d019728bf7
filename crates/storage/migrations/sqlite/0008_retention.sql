-- Legal holds (M6/S16): the records of a user, or of a department and the ones below it,
-- are kept past the retention policy until the hold is lifted.
CREATE TABLE legal_holds (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT REFERENCES users(id) ON DELETE CASCADE,
    department_id TEXT REFERENCES departments(id) ON DELETE CASCADE,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX legal_holds_tenant ON legal_holds (tenant_id);
