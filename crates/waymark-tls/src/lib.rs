//! TLS for Waymark's servers: the gRPC services and the dev Kafka endpoint.
//!
//! A [`ServerTls`] is built from PEM files: a certificate chain, its
//! private key and, for mutual TLS, the CA that signs client certificates.
//! It serves the configuration it loaded last; [`ServerTls::watch`] checks
//! the files every few seconds and loads them again when one changed, so a
//! renewed certificate (cert-manager, a Kubernetes secret update) is used
//! by the next connection without a restart. Connections already open keep
//! the certificate they were made with.
//!
//! # Guarantees
//! - Files that cannot be read or parsed fail [`ServerTls::load`] with the
//!   path and the reason: a server never starts with TLS half-configured.
//! - A reload that fails (a half-written file, a key that does not match)
//!   keeps the configuration that works, logs the reason and counts
//!   `waymark_tls_reloads_total{outcome="failed"}`; it is tried again at
//!   the next change.
//! - With a client CA, a client must present a certificate it signed, or
//!   the handshake fails; [`ClientIdentity::from_certificates`] gives the
//!   names (subject common name, DNS names) that roles can be granted to.
//! - Only TLS 1.2 and 1.3, with rustls' safe default cipher suites, through
//!   the `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often [`ServerTls::watch`] looks at the files by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Metric: certificate reloads, by `outcome` (`loaded` or `failed`).
pub const RELOADS: &str = "waymark_tls_reloads_total";

/// Where a server's TLS material is, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates. When set, every
    /// client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(self.cert.as_path()), Some(self.key.as_path())]
            .into_iter()
            .chain(std::iter::once(self.client_ca.as_deref()))
            .flatten()
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file has no PEM object of the kind expected.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate).
    #[error("tls configuration: {0}")]
    Config(String),
}

/// A server's TLS configuration, reloaded when its files change.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<TlsFiles>,
    alpn: Arc<Vec<Vec<u8>>>,
    state: Arc<RwLock<Loaded>>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `files`; `alpn` are the protocols offered (`h2` for gRPC,
    /// none for Kafka).
    ///
    /// # Errors
    /// When a file cannot be read or parsed, or the key does not match.
    pub fn load(files: TlsFiles, alpn: Vec<Vec<u8>>) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let config = build(&files, &alpn)?;
        Ok(Self {
            files: Arc::new(files),
            alpn: Arc::new(alpn),
            state: Arc::new(RwLock::new(Loaded { config, stamp })),
        })
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the configuration loaded last.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The configuration loaded last.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.state.read() {
            Ok(state) => state.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Loads the files again if one changed (modification time or size)
    /// since the last load; `Ok(true)` when a new configuration is in use.
    ///
    /// # Errors
    /// When the changed files do not load; the previous configuration
    /// stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        {
            let state = match self.state.read() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            if state.stamp == now {
                return Ok(false);
            }
        }
        let built = build(&self.files, &self.alpn);
        let mut state = match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Tried once per change: a broken file is reported once, not every
        // interval, and a fixed one changes the stamp again.
        state.stamp = now;
        let config = built?;
        state.config = config;
        Ok(true)
    }

    /// Checks the files every `interval` until `shutdown`, loading them
    /// again when they change.
    pub fn watch(&self, interval: Duration, shutdown: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match tls.reload_if_changed() {
                    Ok(false) => {}
                    Ok(true) => {
                        metrics::counter!(RELOADS, "outcome" => "loaded").increment(1);
                        info!(cert = %tls.files.cert.display(), "tls certificate reloaded");
                    }
                    Err(e) => {
                        metrics::counter!(RELOADS, "outcome" => "failed").increment(1);
                        warn!(error = %e, "tls files changed but do not load; the previous certificate stays in use");
                    }
                }
            }
        });
    }
}

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, per listener; more connections wait in
/// the kernel's accept queue.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Metric: handshakes that failed (plaintext to a TLS port, a client
/// certificate not signed by the client CA, a timeout), by `listener`.
pub const HANDSHAKE_FAILURES: &str = "waymark_tls_handshake_failures_total";

/// Accepts connections on `listener` until `shutdown`, completes each
/// TLS handshake with the configuration loaded last, and sends the
/// established streams to `ready`. A failed handshake is logged at debug
/// level and counted under `label`; it never stops the loop.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    label: &'static str,
    ready: tokio::sync::mpsc::Sender<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(listener = label, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.acceptor();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send(stream).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!(HANDSHAKE_FAILURES, "listener" => label).increment(1);
                    tracing::debug!(listener = label, %peer, error = %e, "tls handshake failed");
                }
                Err(_) => {
                    metrics::counter!(HANDSHAKE_FAILURES, "listener" => label).increment(1);
                    tracing::debug!(listener = label, %peer, "tls handshake timed out");
                }
            }
        });
    }
}

/// Modification time and size of each file (`None`: unreadable).
fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    files
        .paths()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The crypto provider of every configuration: `ring`, named rather than
/// taken from the process default, so another crate enabling a second
/// provider cannot make the choice ambiguous.
/// (`ring` rather than rustls' preferred `aws-lc-rs`, which would add a
/// long C and assembly build to every fresh build; `ring` lacks only the
/// post-quantum key exchanges.)
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: ca.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.key.display())))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file, in order.
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no CERTIFICATE in it".to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
///
/// # Errors
/// When the file cannot be read or holds no private key.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("no private key in it ({e})"),
    })
}

/// Who a client certificate names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// The DNS names of its subject alternative names.
    pub dns_names: Vec<String>,
}

impl ClientIdentity {
    /// The identity of the leaf of a verified chain; `None` when there is
    /// no certificate or it cannot be parsed.
    pub fn from_certificates(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let leaf = chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            common_name,
            dns_names,
        })
    }

    /// Every name: the common name first, then the DNS names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.common_name
            .as_deref()
            .into_iter()
            .chain(self.dns_names.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{CertificateParams, DnType, KeyPair};

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn self_signed(cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![cn.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("localhost");
        let cert = write(dir.path(), "cert.pem", &cert);
        let key_path = write(dir.path(), "key.pem", &key);
        let empty = write(dir.path(), "empty.pem", "");
        let files = |cert: &Path, key: &Path| TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: None,
        };
        assert!(ServerTls::load(files(&cert, &key_path), vec![]).is_ok());
        let e = ServerTls::load(files(&empty, &key_path), vec![]).unwrap_err();
        assert!(e.to_string().contains("empty.pem: no CERTIFICATE"), "{e}");
        let e = ServerTls::load(files(&cert, &empty), vec![]).unwrap_err();
        assert!(e.to_string().contains("empty.pem: no private key"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = ServerTls::load(files(&cert, &missing), vec![]).unwrap_err();
        assert!(e.to_string().starts_with("cannot read"), "{e}");
        // A key of another certificate.
        let (_, other_key) = self_signed("other");
        let other_key = write(dir.path(), "other.pem", &other_key);
        let e = ServerTls::load(files(&cert, &other_key), vec![]).unwrap_err();
        assert!(matches!(e, TlsError::Config(_)), "{e}");
    }

    #[test]
    fn a_changed_certificate_is_loaded_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("one");
        let files = TlsFiles {
            cert: write(dir.path(), "cert.pem", &cert),
            key: write(dir.path(), "key.pem", &key),
            client_ca: None,
        };
        let tls = ServerTls::load(files, vec![b"h2".to_vec()]).unwrap();
        let first = tls.config();
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");

        // A renewed pair (different size, so the stamp differs even within
        // the file system's time resolution).
        let (cert, key) = self_signed("a-renewed-certificate-name");
        write(dir.path(), "cert.pem", &cert);
        write(dir.path(), "key.pem", &key);
        assert!(tls.reload_if_changed().unwrap());
        let second = tls.config();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.alpn_protocols, vec![b"h2".to_vec()]);

        // Half-written: refused, the renewed one stays.
        write(dir.path(), "cert.pem", "-----BEGIN CERTIFICATE-----\n");
        assert!(tls.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&second, &tls.config()));
        // Reported once per change.
        assert!(!tls.reload_if_changed().unwrap());
    }

    #[test]
    fn a_client_certificate_names_its_identity() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["replayer.ops.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "replayer");
        let cert = params.self_signed(&key).unwrap();
        let identity = ClientIdentity::from_certificates(&[cert.der().clone()]).unwrap();
        assert_eq!(identity.common_name.as_deref(), Some("replayer"));
        assert_eq!(identity.dns_names, vec!["replayer.ops.example".to_owned()]);
        assert_eq!(
            identity.names().collect::<Vec<_>>(),
            vec!["replayer", "replayer.ops.example"]
        );
        assert_eq!(ClientIdentity::from_certificates(&[]), None);
    }
}
