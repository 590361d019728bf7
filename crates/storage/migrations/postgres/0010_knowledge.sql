-- Knowledge (M8, S1, S14): collections of documents owned by a department or shared by
-- the tenant, each with a classification (機密性 1–3) and optionally limited to named
-- members; documents with their pages and passages; durable ingestion jobs. The files
-- themselves live in the file store under the data directory, by content hash.
CREATE TABLE collections (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    department_id TEXT REFERENCES departments(id),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    classification BIGINT NOT NULL,
    restricted BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE collection_members (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, user_id)
);

CREATE TABLE kb_documents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    pages BIGINT,
    pages_done BIGINT NOT NULL,
    ocr_pages TEXT NOT NULL,
    error TEXT,
    uploaded_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (collection_id, sha256)
);
CREATE INDEX kb_documents_tenant ON kb_documents (tenant_id, collection_id);

CREATE TABLE kb_pages (
    document_id TEXT NOT NULL REFERENCES kb_documents(id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    page BIGINT NOT NULL,
    ocr BIGINT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (document_id, page)
);

CREATE TABLE kb_chunks (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    document_id TEXT NOT NULL REFERENCES kb_documents(id) ON DELETE CASCADE,
    collection_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    page BIGINT NOT NULL,
    heading TEXT,
    text TEXT NOT NULL
);
CREATE INDEX kb_chunks_document ON kb_chunks (document_id, seq);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    locked_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_queue ON jobs (status, created_at);

-- Which classes of information a model may receive (S14): cloud models up to 2 by
-- default, local models up to 3.
ALTER TABLE llm_models ADD COLUMN max_class BIGINT NOT NULL DEFAULT 2;

-- The passages a question was asked over (JSON): citations and regeneration.
ALTER TABLE messages ADD COLUMN sources TEXT;

-- A template may ask over knowledge (RAG templates): NULL none, a JSON list of collection
-- ids, an empty list for every collection the user may read.
ALTER TABLE prompt_templates ADD COLUMN knowledge TEXT;
