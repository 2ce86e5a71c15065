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
use crate::error::TlsSetupError;

/// A client TLS setup for one probe config.
pub fn connector(config: &TlsConfig) -> Result<TlsConnector, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Provider)?;
    let client = if config.verify {
        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped: a CA file may be all we need.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &config.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| TlsSetupError::CaFile { path: path.clone(), error })?;
            if certs.is_empty() {
                return Err(TlsSetupError::NoCertificate { path: path.clone() });
            }
            for cert in certs {
                roots.add(cert).map_err(|error| TlsSetupError::BadCertificate { path: path.clone(), error })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(client)))
}

/// The name to verify: the configured one, else the backend's IP address.
pub fn server_name(config: &TlsConfig, ip: std::net::IpAddr) -> Result<ServerName<'static>, TlsSetupError> {
    match &config.server_name {
        Some(name) => {
            ServerName::try_from(name.clone()).map_err(|error| TlsSetupError::ServerName { name: name.clone(), error })
        }
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
