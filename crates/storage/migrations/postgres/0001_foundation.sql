-- Tenants (cities), departments, accounts, sign-in, sessions, audit chain.
-- Every table carries tenant_id: the tenant is the shard key.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    host TEXT UNIQUE,
    settings TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE departments (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    parent_id TEXT REFERENCES departments(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, path)
);
CREATE INDEX departments_parent ON departments (tenant_id, parent_id);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    login_id TEXT NOT NULL,
    display_name TEXT NOT NULL,
    email TEXT,
    department_id TEXT NOT NULL REFERENCES departments(id),
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    password_temporary BIGINT NOT NULL,
    password_expires_at BIGINT,
    password_changed_at BIGINT NOT NULL,
    last_login_at BIGINT,
    locked_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant_id, login_id)
);
CREATE INDEX users_department ON users (tenant_id, department_id);
CREATE INDEX users_last_login ON users (tenant_id, last_login_at);

CREATE TABLE login_attempts (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT,
    login_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    success BIGINT NOT NULL,
    ip TEXT NOT NULL
);
CREATE INDEX login_attempts_user ON login_attempts (tenant_id, user_id, at);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    prev_login_at BIGINT,
    failures_since BIGINT NOT NULL,
    ip TEXT NOT NULL,
    user_agent TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE audit_heads (
    tenant_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE audit_log (
    tenant_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    actor_id TEXT,
    actor_login TEXT NOT NULL,
    ip TEXT NOT NULL,
    user_agent TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    result TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX audit_log_at ON audit_log (tenant_id, at);

CREATE TABLE pending_imports (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    create_departments BIGINT NOT NULL,
    content TEXT NOT NULL
);
