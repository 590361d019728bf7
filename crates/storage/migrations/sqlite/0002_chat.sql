-- LLM providers and models a tenant has configured, which departments may use each
-- model, conversations and their messages, and failures for admins (S9).
CREATE TABLE llm_providers (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    base_url TEXT NOT NULL,
    api_key TEXT NOT NULL,
    api_version TEXT,
    proxy TEXT,
    region TEXT NOT NULL,
    no_training INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE llm_models (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    provider_id TEXT NOT NULL REFERENCES llm_providers(id),
    model TEXT NOT NULL,
    display_name TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    is_default INTEGER NOT NULL,
    all_departments INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (tenant_id, display_name)
);

CREATE TABLE llm_model_departments (
    model_id TEXT NOT NULL REFERENCES llm_models(id) ON DELETE CASCADE,
    department_id TEXT NOT NULL REFERENCES departments(id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    PRIMARY KEY (model_id, department_id)
);

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX conversations_user ON conversations (tenant_id, user_id, updated_at);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    model_id TEXT,
    model_name TEXT,
    provider_name TEXT,
    error_code TEXT,
    error_detail TEXT,
    attachment_name TEXT,
    input_chars INTEGER NOT NULL,
    output_chars INTEGER NOT NULL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    ttft_ms INTEGER,
    total_ms INTEGER,
    created_at INTEGER NOT NULL,
    UNIQUE (conversation_id, seq)
);

CREATE TABLE failures (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    source TEXT NOT NULL,
    code TEXT NOT NULL,
    detail TEXT NOT NULL,
    user_id TEXT
);
CREATE INDEX failures_at ON failures (tenant_id, at);
