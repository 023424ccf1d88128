//! Certificates made at test time (rcgen): a private CA, server certificates it signs (valid,
//! expired, for another name), and PEM files for `--tls-cert`/`--tls-key`/`--ca-file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};

/// A certificate authority of our own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A server certificate and key, written out as PEM files.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's DER, to tell which one a server presented.
    pub der: Vec<u8>,
}

/// How long a server certificate is valid.
pub enum Validity {
    Now,
    Expired,
}

/// A self-signed server certificate for `names`, in `dir/TAG.crt` and `dir/TAG.key` (the
/// certificate is its own `--ca-file`); `ca` sets basicConstraints CA:TRUE, as
/// `openssl req -x509` does by default, otherwise CA:FALSE.
pub fn self_signed(dir: &Path, tag: &str, names: &[&str], ca: bool) -> ServerCert {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    // Not a host name as its subject: a system store may hold another `CN=localhost`.
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Parley self-signed {tag}"));
    params.is_ca = if ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    ServerCert::write(dir, tag, &cert, &key)
}

impl ServerCert {
    /// Writes `cert` and `key` to `dir/TAG.crt` and `dir/TAG.key`.
    fn write(dir: &Path, tag: &str, cert: &rcgen::Certificate, key: &KeyPair) -> ServerCert {
        let cert_path = dir.join(format!("{tag}.crt"));
        let key_path = dir.join(format!("{tag}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ServerCert {
            cert: cert_path,
            key: key_path,
            der: cert.der().to_vec(),
        }
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate to `dir/NAME` (for `--ca-file`).
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A server certificate for `names` (DNS names or IP addresses), written to
    /// `dir/TAG.crt` and `dir/TAG.key`.
    pub fn server(&self, dir: &Path, tag: &str, names: &[&str], validity: Validity) -> ServerCert {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if let Validity::Expired = validity {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert::write(dir, tag, &cert, &key)
    }
}

/// A TLS client configuration that trusts `ca_pem` only (rustls, `ring`).
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
