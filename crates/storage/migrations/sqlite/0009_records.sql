-- Disposal (M12, S16): what was destroyed, when, by whom and with whose approval. A record
-- outlives what it describes, so it has no foreign keys; a tenant disposal is requested by
-- one admin and approved by another. The certificate can be fetched once more after a
-- tenant disposal (its admins are gone) with a key shown to the approver.
CREATE TABLE disposals (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    tenant_name TEXT NOT NULL,
    scope TEXT NOT NULL,
    target_id TEXT NOT NULL,
    target_label TEXT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_by_id TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    approved_by TEXT,
    approved_at INTEGER,
    executed_at INTEGER,
    counts TEXT NOT NULL,
    method TEXT NOT NULL,
    key_digest TEXT,
    key_expires_at INTEGER
);
CREATE INDEX disposals_tenant ON disposals (tenant_id, requested_at);

-- Alerts from the periodic analysis of the audit log (S8). One alert per rule, subject and
-- window, so a rerun of the analysis never doubles one; the events it rests on are listed
-- by their audit sequence numbers.
CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    window_key TEXT NOT NULL,
    summary TEXT NOT NULL,
    event_seqs TEXT NOT NULL,
    at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at INTEGER,
    mailed_at INTEGER,
    UNIQUE (tenant_id, rule, subject, window_key)
);
CREATE INDEX alerts_tenant ON alerts (tenant_id, at);

-- How far each tenant's audit log has been analysed.
CREATE TABLE alert_cursors (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    last_seq INTEGER NOT NULL
);
