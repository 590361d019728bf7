-- Vector search over knowledge (M8), and the log that keeps every node's index in step: the embedding model a tenant's knowledge uses (at
-- most one, with the highest class of information it may receive — S14), and one vector
-- per passage, quantised (scale + one byte per dimension, base64), tagged with the model
-- that made it so that vectors of different models never mix. `min_score_pct`: a passage
-- found by its vector alone must be at least this similar (cosine, in per cent) to count.
CREATE TABLE kb_embedders (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    provider_id TEXT NOT NULL REFERENCES llm_providers(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    max_class BIGINT NOT NULL,
    min_score_pct BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE kb_vectors (
    chunk_id TEXT PRIMARY KEY REFERENCES kb_chunks(id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    model TEXT NOT NULL,
    vector TEXT NOT NULL
);
CREATE INDEX kb_vectors_tenant ON kb_vectors (tenant_id, model, chunk_id);
CREATE INDEX kb_vectors_document ON kb_vectors (document_id);

-- What changed in the passages, in commit order as far as the database tells: every app
-- node keeps its own search index in step by reading it (the database is the truth; an
-- index is rebuilt from it whenever it cannot follow). `op`: `document` (make the
-- document's entries match the database), `collection` (gone), `embedder` (the vectors
-- were reset), `disposed` (the tenant's data was erased).
CREATE TABLE kb_index_log (
    seq BIGSERIAL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    op TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX kb_index_log_tenant ON kb_index_log (tenant_id, seq);
CREATE INDEX kb_index_log_at ON kb_index_log (tenant_id, at);
