//! TLS for HTTPS probes (rustls): the backend's certificate is verified
//! against the system roots plus an optional CA file, for the configured name
//! or the backend's IP address; `tls_verify = false` accepts any certificate
//! (self-signed backends), explicitly.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::config::TlsConfig;

/// A client TLS setup for one probe config.
pub fn connector(config: &TlsConfig) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let client = if config.verify {
        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped: a CA file may be all we need.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &config.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("tls_ca_file {}: no PEM certificate in it", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(client)))
}

/// The name to verify: the configured one, else the backend's IP address.
pub fn server_name(config: &TlsConfig, ip: std::net::IpAddr) -> Result<ServerName<'static>, String> {
    match &config.server_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|e| format!("tls_server_name `{name}`: {e}")),
        None => Ok(ServerName::IpAddress(ip.into())),
    }
}

/// `tls_verify = false`: any certificate is accepted (signatures still checked).
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
