-- Issue 14: the admin audit log and named admin users with roles
-- (server/src/audit.rs). Records are crate::audit::{AuditRecord, User} as
-- JSON; the audit sequence is the table's own, so replicas share one order.
CREATE TABLE audit (
    seq    BIGSERIAL PRIMARY KEY,
    record JSONB NOT NULL
);
CREATE TABLE users (
    name         TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    record       JSONB NOT NULL
);
