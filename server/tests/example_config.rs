//! The example configuration in deploy/ parses and validates.

#[test]
fn deploy_server_toml_is_valid() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(c.checkin.lease_ms, 120_000);
    assert!(c.tls.is_none());
}

#[test]
fn deploy_replica_example_is_valid() {
    use ota_server::config::{StorageBackend, ThrottleBackend};
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/server-replica.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(c.storage.backend, StorageBackend::Postgres);
    assert_eq!(c.throttle.backend, ThrottleBackend::Redis);
}

#[test]
fn a_shared_throttle_without_shared_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(
        &p,
        "data_dir = \"d\"\nadmin_token = \"0123456789abcdef\"\nsigning_key = \"k\"\n\
         [throttle]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1/\"\n",
    )
    .unwrap();
    let e = ota_server::config::ServerConfig::load(&p).unwrap_err();
    assert!(e.to_string().contains("needs storage.backend"), "{e}");
}
