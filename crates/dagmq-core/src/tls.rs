//! TLS material shared by every client connection (RabbitMQ, Redis, HTTPS): an extra trust root
//! for a private CA and a client identity for mutual TLS. Read once from PEM files; each adapter
//! hands it to its own TLS library. Which connections use TLS is the URL's choice (`amqps://`,
//! `rediss://`, `https://`); these settings only say whom to trust and who we are.

use std::fmt;
use std::path::Path;

/// Trust roots and client identity, as PEM bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Certificates of a private CA (PEM, one or more), trusted besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate and key to present when the server asks for one (mutual TLS).
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .field("client", &self.client)
            .finish()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log.
        f.debug_struct("ClientIdentity").field("cert_pem", &format!("{} bytes", self.cert_pem.len())).finish()
    }
}

impl TlsSettings {
    /// Reads the files a user named: a CA bundle, and a client certificate with its key (both or
    /// neither). Each file must hold at least one PEM block of the right kind; an error names
    /// the file and what is wrong with it.
    pub fn load(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsSettings, String> {
        let ca_pem = ca.map(|path| read_pem(path, "CA certificate", &["CERTIFICATE"])).transpose()?;
        let client = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read_pem(cert, "client certificate", &["CERTIFICATE"])?,
                key_pem: read_pem(key, "client key", &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"])?,
            }),
            (Some(_), None) => return Err("a client certificate needs its key (--tls-key)".to_string()),
            (None, Some(_)) => return Err("a client key needs its certificate (--tls-cert)".to_string()),
        };
        Ok(TlsSettings { ca_pem, client })
    }

    /// Whether nothing was set: the system's roots, no client certificate.
    pub fn is_default(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }
}

/// Reads a PEM file that must hold a block labelled with one of `labels`.
fn read_pem(path: &Path, what: &str, labels: &[&str]) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !labels.iter().any(|label| text.contains(&format!("-----BEGIN {label}-----"))) {
        return Err(format!("{what} {}: no PEM block \"BEGIN {}\" in the file", path.display(), labels[0]));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n";

    fn file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads_files_and_names_the_bad_one() {
        let dir = std::env::temp_dir().join(format!("dagmq-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = file(&dir, "ca.pem", CERT);
        let cert = file(&dir, "client.pem", CERT);
        let key = file(&dir, "client.key", KEY);
        let settings = TlsSettings::load(Some(&ca), Some(&cert), Some(&key)).unwrap();
        assert_eq!(settings.ca_pem.as_deref(), Some(CERT.as_bytes()));
        assert_eq!(settings.client.as_ref().unwrap().key_pem, KEY.as_bytes());
        assert!(!format!("{settings:?}").contains("BBBB"), "the key is never printed");
        assert!(TlsSettings::load(None, None, None).unwrap().is_default());

        let err = TlsSettings::load(Some(&key), None, None).unwrap_err();
        assert!(err.contains("ca.pem") || err.contains("client.key"), "{err}");
        assert!(err.contains("no PEM block \"BEGIN CERTIFICATE\""), "{err}");
        let err = TlsSettings::load(Some(&dir.join("missing.pem")), None, None).unwrap_err();
        assert!(err.contains("missing.pem: cannot read"), "{err}");
        assert!(TlsSettings::load(None, Some(&cert), None).unwrap_err().contains("needs its key"));
        assert!(TlsSettings::load(None, None, Some(&key)).unwrap_err().contains("needs its certificate"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
