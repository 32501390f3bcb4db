//! How `waymark dev` and `waymark serve` secure their gRPC port, and the
//! rule that keeps an unsecured port on loopback.
//!
//! # Guarantees
//! - A gRPC address that is not loopback is served only with TLS **and**
//!   a way to authenticate (tokens, JWTs or client-certificate roles), or
//!   with `--insecure` given on purpose; otherwise the command stops before
//!   it listens, naming the flags.
//! - TLS and auth files are read before the port opens: a missing or
//!   malformed file is a start-up error with its path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use waymark_server::auth::{AuthConfig, Authenticator, JwtConfig, Roles};
use waymark_server::Security;
use waymark_tls::{ServerTls, TlsFiles};

/// What secures the gRPC port, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct GrpcSecurityOptions {
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA of client certificates: mutual TLS.
    pub tls_client_ca: Option<PathBuf>,
    /// Who may call what.
    pub auth: AuthConfig,
    /// Serve a non-loopback address unsecured anyway.
    pub insecure: bool,
}

impl GrpcSecurityOptions {
    /// Reads the files and applies the loopback rule for `addr`.
    ///
    /// # Errors
    /// Half a TLS pair, an unreadable or malformed file, or a non-loopback
    /// address without TLS and authentication (and without `insecure`).
    pub fn load(&self, addr: SocketAddr) -> anyhow::Result<Security> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    bail!("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key");
                }
                None
            }
            (Some(cert), Some(key)) => Some(
                ServerTls::load(
                    TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.tls_client_ca.clone(),
                    },
                    vec![b"h2".to_vec()],
                )
                .context("gRPC TLS")?,
            ),
            _ => bail!("--grpc-tls-cert and --grpc-tls-key go together"),
        };
        if !self.auth.certificate_roles.is_empty() && self.tls_client_ca.is_none() {
            bail!("--grpc-cert-role needs --grpc-tls-client-ca (client certificates are verified against it)");
        }
        let auth = Authenticator::load(&self.auth).context("gRPC authentication")?;
        check_exposure(
            "gRPC",
            addr,
            tls.is_some(),
            auth.is_enabled(),
            self.insecure,
            "--grpc-tls-cert and --grpc-tls-key, and --grpc-tokens, --grpc-jwks or --grpc-cert-role",
        )?;
        if !addr.ip().is_loopback() && self.insecure && (tls.is_none() || !auth.is_enabled()) {
            tracing::warn!(%addr, tls = tls.is_some(), auth = auth.is_enabled(),
                "--insecure: serving gRPC beyond loopback without TLS and authentication");
        }
        Ok(Security {
            tls,
            auth: Arc::new(auth),
        })
    }
}

/// The loopback rule: a port beyond loopback needs encryption and
/// authentication, or `insecure`.
///
/// # Errors
/// When the rule is broken, with the flags that fix it.
pub fn check_exposure(
    what: &str,
    addr: SocketAddr,
    encrypted: bool,
    authenticated: bool,
    insecure: bool,
    flags: &str,
) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || (encrypted && authenticated) || insecure {
        return Ok(());
    }
    let missing = match (encrypted, authenticated) {
        (false, false) => "TLS and authentication",
        (false, true) => "TLS",
        _ => "authentication",
    };
    bail!(
        "refusing to serve {what} on {addr} without {missing}: anyone who can reach it could \
         use it. Give {flags} (see docs/operations/security.md), bind a loopback address, or \
         pass --insecure to serve it unsecured anyway"
    )
}

/// Parses `NAME=ROLES` of `--grpc-cert-role`.
///
/// # Errors
/// Not `NAME=ROLES`, or an unknown role.
pub fn parse_certificate_role(text: &str) -> Result<(String, Roles), String> {
    let (name, roles) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=ROLES (e.g. replayer=admin,query)"))?;
    if name.trim().is_empty() {
        return Err(format!("{text:?} has no name"));
    }
    Ok((name.trim().to_owned(), Roles::parse(roles)?))
}

/// JWT settings from the three flags, all or none.
///
/// # Errors
/// When only some are given.
pub fn jwt_config(
    jwks: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
) -> anyhow::Result<Option<JwtConfig>> {
    match (jwks, issuer, audience) {
        (None, None, None) => Ok(None),
        (Some(jwks), Some(issuer), Some(audience)) => Ok(Some(JwtConfig {
            jwks,
            issuer,
            audience,
        })),
        _ => bail!("--grpc-jwks, --grpc-jwt-issuer and --grpc-jwt-audience go together"),
    }
}

/// A secret (token, password) from a file: its first line, without the
/// line ending (so `echo secret > file` works).
///
/// # Errors
/// When the file cannot be read or is empty; the message never holds the
/// file's content.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("");
    if secret.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(secret.to_owned())
}

/// A new random token (256 bits, URL-safe) and its tokens-file line.
///
/// # Errors
/// When the system's random source fails.
pub fn new_token(name: &str, roles: Roles) -> anyhow::Result<(String, String)> {
    if name.is_empty() || name.chars().any(char::is_whitespace) || name.contains('#') {
        bail!("a token's name is one word without '#': {name:?}");
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let mut token = String::from("wmk_");
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    let line = format!(
        "{} {name} {roles}",
        waymark_server::auth::token_digest(&token)
    );
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_loopback_may_be_unsecured() {
        let lo: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let lo6: SocketAddr = "[::1]:50051".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(check_exposure("gRPC", lo, false, false, false, "F").is_ok());
        assert!(check_exposure("gRPC", lo6, false, false, false, "F").is_ok());
        let e = check_exposure("gRPC", any, false, false, false, "--flags").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("without TLS and authentication"), "{text}");
        assert!(
            text.contains("--flags") && text.contains("--insecure"),
            "{text}"
        );
        assert!(check_exposure("gRPC", any, true, false, false, "F")
            .unwrap_err()
            .to_string()
            .contains("without authentication"));
        assert!(check_exposure("gRPC", any, false, true, false, "F")
            .unwrap_err()
            .to_string()
            .contains("without TLS"));
        assert!(check_exposure("gRPC", any, true, true, false, "F").is_ok());
        assert!(check_exposure("gRPC", any, false, false, true, "F").is_ok());
    }

    #[test]
    fn the_default_options_serve_loopback_open_and_refuse_the_world() {
        let options = GrpcSecurityOptions::default();
        let security = options.load("127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(security.tls.is_none() && !security.auth.is_enabled());
        assert!(options.load("0.0.0.0:1".parse().unwrap()).is_err());
        let insecure = GrpcSecurityOptions {
            insecure: true,
            ..GrpcSecurityOptions::default()
        };
        assert!(insecure.load("0.0.0.0:1".parse().unwrap()).is_ok());
    }

    #[test]
    fn new_tokens_verify_against_their_line() {
        let (token, line) = new_token("ci", Roles::parse("ingest").unwrap()).unwrap();
        assert!(token.starts_with("wmk_") && token.len() == 68);
        assert!(!line.contains(&token), "the line holds the digest only");
        let file = waymark_server::auth::TokenFile::parse(&line).unwrap();
        assert_eq!(file.len(), 1);
        assert!(new_token("two words", Roles::parse("query").unwrap()).is_err());
        let (other, _) = new_token("ci", Roles::parse("ingest").unwrap()).unwrap();
        assert_ne!(token, other);
    }

    #[test]
    fn certificate_roles_parse() {
        let (name, roles) = parse_certificate_role("replayer=admin,query").unwrap();
        assert_eq!(name, "replayer");
        assert_eq!(roles.to_string(), "query,admin");
        assert!(parse_certificate_role("replayer").is_err());
        assert!(parse_certificate_role("x=root").is_err());
    }
}
