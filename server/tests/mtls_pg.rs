//! The whole `mtls` suite again on PostgreSQL (the revocation list and the
//! issued certificates live in the `device_certs` table). Needs
//! `scripts/services.sh start`.

#[path = "mtls.rs"]
mod suite;
