-- Client certificates (mTLS, issue 17): those the server issued at CSR
-- enrollment, and those revoked (also ones it did not issue, by serial).
-- Serials are lowercase hex without leading zeros.
CREATE TABLE device_certs (
    serial          text PRIMARY KEY,
    device          text NOT NULL,
    issued_at_ms    bigint NOT NULL,
    revoked_at_ms   bigint
);
CREATE INDEX device_certs_by_device ON device_certs (device);
