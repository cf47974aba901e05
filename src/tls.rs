//! The server's TLS identity (rustls with the ring provider): loaded from PEM files, or generated
//! at start-up so encryption never depends on an operator step. A generated identity is a small
//! private CA plus a server certificate it signed: GnuTLS clients (TigerVNC, gtk-vnc) want a CA
//! as trust anchor, webpki clients refuse a CA certificate as the server's own.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A ready server configuration plus what operators need to pin or trust it.
#[derive(Clone)]
pub struct TlsIdentity {
    pub config: Arc<ServerConfig>,
    /// The same identity limited to TLS 1.2, for VeNCrypt: in TLS 1.3 the client's Finished
    /// comes last, and TigerVNC 1.12 keeps it in its buffer until it has something to send,
    /// while VNC authentication waits for the server to speak first — both sides wait forever.
    pub config_tls12: Arc<ServerConfig>,
    /// What clients should trust, in PEM: the generated CA, or the operator's certificate file.
    pub trust_pem: String,
    /// SHA-256 of the leaf certificate, `AA:BB:…`, for logs.
    pub fingerprint: String,
    /// The leaf's SubjectPublicKey bits: CredSSP (RDP's NLA) binds the session to them.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads a certificate chain and private key (PKCS#8, PKCS#1 or SEC1) from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
        anyhow::ensure!(
            !chain.is_empty(),
            "{}: no certificate in it",
            cert.display()
        );
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading TLS key {}", key.display()))?;
        Self::build(chain, key, cert_pem)
    }

    /// A fresh CA (its key is discarded) and a server certificate for `names` (DNS names or
    /// IP addresses) signed by it, valid from an hour ago (clients' clocks drift) for
    /// [`GENERATED_VALIDITY`], as a public CA would issue it: clients and policies refuse
    /// server certificates valid for longer than 398 days.
    pub fn generate(names: &[String]) -> Result<Self> {
        let (chain, key, trust_pem) = generate_chain(names)?;
        Self::build(chain, key, trust_pem)
    }

    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_pem: String,
    ) -> Result<Self> {
        let digest = ring::digest::digest(&ring::digest::SHA256, chain[0].as_ref());
        let fingerprint = digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let public_key = {
            use x509_cert::der::Decode as _;
            let leaf = x509_cert::Certificate::from_der(chain[0].as_ref())
                .context("parsing the server certificate")?;
            leaf.tbs_certificate
                .subject_public_key_info
                .subject_public_key
                .raw_bytes()
                .to_vec()
        };
        let config = |versions: &[&'static rustls::SupportedProtocolVersion]| {
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .context("TLS protocol versions")?
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())
                .context("TLS certificate and key do not match or are unsupported")
        };
        Ok(Self {
            config: Arc::new(config(rustls::DEFAULT_VERSIONS)?),
            config_tls12: Arc::new(config(&[&rustls::version::TLS12])?),
            trust_pem,
            fingerprint,
            public_key,
        })
    }
}

/// The server certificate, its CA, the server key, and the CA as PEM.
type GeneratedChain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String);

fn generate_chain(names: &[String]) -> Result<GeneratedChain> {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + GENERATED_VALIDITY;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "vdi-sidecar generated CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?).context("generating a CA")?;
    let mut leaf = CertificateParams::new(names.to_vec()).context("certificate names")?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("vdi-sidecar", String::as_str),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (leaf.not_before, leaf.not_after) = (not_before, not_after);
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let leaf_key = KeyPair::generate()?;
    let cert = leaf
        .signed_by(&leaf_key, &ca)
        .context("signing the server certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok((vec![cert.der().clone(), ca.der().clone()], key, ca.pem()))
}

/// How long a generated certificate is valid: one day inside the CA/Browser Forum's 398-day limit
/// (which Apple's and Chrome's policies enforce). The sidecar makes a new one at every start.
pub const GENERATED_VALIDITY: time::Duration = time::Duration::days(397);

/// Names a generated certificate covers: loopback, this host's name, and `extra`.
pub fn default_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    names.extend(extra.iter().cloned());
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_are_valid_now_and_for_at_most_398_days() {
        use x509_cert::der::Decode as _;
        let (chain, _, _) = generate_chain(&default_names(&[])).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert_eq!(chain.len(), 2);
        for der in chain {
            let cert = x509_cert::Certificate::from_der(&der).unwrap();
            let v = &cert.tbs_certificate.validity;
            let (from, to) = (
                v.not_before.to_unix_duration(),
                v.not_after.to_unix_duration(),
            );
            assert!(from <= now && now < to, "{from:?}..{to:?} misses {now:?}");
            let days = (to - from).as_secs() as f64 / 86_400.0;
            assert!((397.0..=398.0).contains(&days), "{days} days");
        }
    }

    #[test]
    fn generated_identity_round_trips_through_files() {
        let id = TlsIdentity::generate(&default_names(&[])).unwrap();
        assert!(id.trust_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(id.fingerprint.len(), 32 * 3 - 1);
        // An uncompressed P-256 point.
        assert_eq!((id.public_key.len(), id.public_key[0]), (65, 4));
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["vm.example".to_owned()]).unwrap();
        std::fs::write(dir.path().join("c.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), ck.signing_key.serialize_pem()).unwrap();
        let loaded = TlsIdentity::load(&dir.path().join("c.pem"), &dir.path().join("k.pem"));
        assert!(loaded.is_ok(), "{loaded:?}");
        // A key that does not belong to the certificate is refused with a reason.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("k2.pem"), other.serialize_pem()).unwrap();
        let err =
            TlsIdentity::load(&dir.path().join("c.pem"), &dir.path().join("k2.pem")).unwrap_err();
        assert!(format!("{err:#}").contains("do not match"), "{err:#}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        assert!(
            TlsIdentity::load(&dir.path().join("empty.pem"), &dir.path().join("k.pem")).is_err()
        );
    }
}
