-- Usage in characters (M4): one row per chat request for the reports, running totals per
-- month and scope for the checks before a request, and the allocations and caps admins set.
-- Usage rows keep the names they were made under, so reports survive renames and
-- deleted accounts.
CREATE TABLE usage_events (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    month TEXT NOT NULL,
    day BIGINT NOT NULL,
    at BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    user_login TEXT NOT NULL,
    user_name TEXT NOT NULL,
    department_id TEXT,
    department_path TEXT NOT NULL,
    dept_chain TEXT NOT NULL,
    model_id TEXT,
    model_name TEXT NOT NULL,
    message_id TEXT,
    status TEXT NOT NULL,
    input_chars BIGINT NOT NULL,
    output_chars BIGINT NOT NULL,
    context_chars BIGINT NOT NULL,
    counted_chars BIGINT NOT NULL,
    input_tokens BIGINT,
    output_tokens BIGINT,
    over_limit BIGINT NOT NULL
);
CREATE INDEX usage_events_month ON usage_events (tenant_id, month, day);
CREATE INDEX usage_events_user ON usage_events (tenant_id, user_id, month);

-- scope: 'tenant', 'd:<department id>' (a department with everything below it) or
-- 'u:<user id>'.
CREATE TABLE usage_counters (
    tenant_id TEXT NOT NULL,
    month TEXT NOT NULL,
    scope TEXT NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, month, scope)
);

CREATE TABLE usage_allocations (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    department_id TEXT NOT NULL REFERENCES departments(id) ON DELETE CASCADE,
    monthly_chars BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, department_id)
);

CREATE TABLE usage_user_caps (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    monthly_chars BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
