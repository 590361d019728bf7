-- Chat logs IT staff must be able to read (M6): a conversation the user deletes is hidden
-- from them but kept for the record until retention removes it; the log is read newest
-- first by time.
ALTER TABLE conversations ADD COLUMN deleted_at BIGINT;
CREATE INDEX messages_log ON messages (tenant_id, created_at, id);
