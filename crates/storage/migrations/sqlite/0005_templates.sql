-- Prompt templates written by a city (M9): tenant-wide, for a department (and the ones
-- below it) or personal; favourites and how often each template (built-in ones too, as
-- 'builtin:<key>') is used.
CREATE TABLE prompt_templates (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    scope TEXT NOT NULL,
    department_id TEXT REFERENCES departments(id) ON DELETE CASCADE,
    owner_id TEXT REFERENCES users(id) ON DELETE CASCADE,
    category TEXT NOT NULL,
    title TEXT NOT NULL,
    purpose TEXT NOT NULL,
    guidance TEXT NOT NULL,
    body TEXT NOT NULL,
    model_id TEXT,
    source_key TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX prompt_templates_tenant ON prompt_templates (tenant_id, scope);

CREATE TABLE template_favourites (
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    template_ref TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, template_ref)
);

CREATE TABLE template_uses (
    tenant_id TEXT NOT NULL,
    template_ref TEXT NOT NULL,
    uses INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, template_ref)
);
