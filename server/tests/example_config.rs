//! The example configuration in deploy/ parses and validates.

#[test]
fn deploy_server_toml_is_valid() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(c.checkin.lease_ms, 120_000);
    assert!(c.tls.is_none());
}
