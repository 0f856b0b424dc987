//! Test certificates made by the real `openssl` CLI: a fleet CA, a server
//! certificate for 127.0.0.1, device certificates with any validity period
//! (`openssl ca -startdate/-enddate`, so expired and not-yet-valid ones
//! too), revocation and CRLs.
//!
//! Standard library only, so `ota-server`'s tests include this file by path
//! (`#[path]`) rather than depending on this crate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of CAs and certificates.
pub struct Pki {
    pub dir: PathBuf,
}

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// Certificate then key, PEM (what `reqwest::Identity::from_pem` reads).
    pub fn identity_pem(&self) -> Vec<u8> {
        let mut v = std::fs::read(&self.cert).unwrap();
        v.push(b'\n');
        v.extend(std::fs::read(&self.key).unwrap());
        v
    }
}

/// Runs openssl in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Pki {
    /// A fleet CA named `ca` and a server certificate `server` for
    /// 127.0.0.1 signed by it.
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir.join("newcerts")).unwrap();
        let pki = Pki { dir: dir.into() };
        pki.new_ca("ca", "fleet CA");
        pki.issue("ca", "server", "localhost", None, "server_ext");
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A self-signed CA: `<name>.pem`, `<name>.key` (PKCS#8).
    pub fn new_ca(&self, name: &str, cn: &str) -> CertFiles {
        let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &key,
                "-out",
                &cert,
            ],
        );
        std::fs::write(self.dir.join(format!("{name}.index")), "").unwrap();
        std::fs::write(self.dir.join(format!("{name}.crlnumber")), "01\n").unwrap();
        std::fs::write(self.dir.join(format!("{name}.serial")), "1000\n").unwrap();
        std::fs::write(self.dir.join(format!("{name}.cnf")), self.ca_config(name)).unwrap();
        CertFiles {
            cert: self.path(&cert),
            key: self.path(&key),
        }
    }

    fn ca_config(&self, name: &str) -> String {
        let d = self.dir.display();
        format!(
            "[ca]\ndefault_ca = this\n[this]\ndatabase = {d}/{name}.index\nnew_certs_dir = {d}/newcerts\n\
             certificate = {d}/{name}.pem\nprivate_key = {d}/{name}.key\nserial = {d}/{name}.serial\ncrlnumber = {d}/{name}.crlnumber\n\
             default_md = sha256\ndefault_days = 2\ndefault_crl_days = 2\npolicy = any\nunique_subject = no\n\
             copy_extensions = none\n[any]\ncommonName = supplied\n\
             [client_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n\
             [server_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1,DNS:localhost\n"
        )
    }

    /// A fresh EC key `<name>.key` and a CSR `<name>.csr` for `/CN=<cn>`.
    pub fn csr(&self, name: &str, cn: &str) -> PathBuf {
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        self.path(&format!("{name}.csr"))
    }

    /// A certificate `<name>.pem` for `/CN=<cn>` signed by CA `ca`, valid
    /// for two days from now, or over `dates` (`YYYYMMDDHHMMSSZ` start and
    /// end).
    pub fn issue(
        &self,
        ca: &str,
        name: &str,
        cn: &str,
        dates: Option<(&str, &str)>,
        ext: &str,
    ) -> CertFiles {
        self.csr(name, cn);
        let cfg = format!("{ca}.cnf");
        let (csr, out) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec![
            "ca",
            "-batch",
            "-notext",
            "-rand_serial",
            "-config",
            &cfg,
            "-extensions",
            ext,
            "-in",
            &csr,
            "-out",
            &out,
        ];
        if let Some((start, end)) = dates {
            args.extend(["-startdate", start, "-enddate", end]);
        }
        openssl(&self.dir, &args);
        CertFiles {
            cert: self.path(&out),
            key: self.path(&format!("{name}.key")),
        }
    }

    /// A client certificate for device `cn` from the fleet CA.
    pub fn device(&self, name: &str, cn: &str) -> CertFiles {
        self.issue("ca", name, cn, None, "client_ext")
    }

    /// The serial of a certificate, as `openssl x509 -serial` prints it.
    pub fn serial(&self, cert: &Path) -> String {
        let s = openssl(
            &self.dir,
            &["x509", "-noout", "-serial", "-in", cert.to_str().unwrap()],
        );
        s.trim().trim_start_matches("serial=").to_string()
    }

    /// Revokes `cert` in CA `ca`'s database and writes its CRL
    /// `<ca>.crl.pem`.
    pub fn revoke_and_crl(&self, ca: &str, cert: &Path) -> PathBuf {
        let cfg = format!("{ca}.cnf");
        openssl(
            &self.dir,
            &["ca", "-config", &cfg, "-revoke", cert.to_str().unwrap()],
        );
        let out = format!("{ca}.crl.pem");
        openssl(&self.dir, &["ca", "-config", &cfg, "-gencrl", "-out", &out]);
        self.path(&out)
    }

    /// `openssl verify` of `cert` against CA `ca`.
    pub fn verifies(&self, ca: &str, cert: &Path) -> bool {
        Command::new("openssl")
            .args(["verify", "-CAfile", &format!("{ca}.pem")])
            .arg(cert)
            .current_dir(&self.dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// The subject line of a certificate.
    pub fn subject(&self, cert: &Path) -> String {
        openssl(
            &self.dir,
            &["x509", "-noout", "-subject", "-in", cert.to_str().unwrap()],
        )
        .trim()
        .to_string()
    }
}
