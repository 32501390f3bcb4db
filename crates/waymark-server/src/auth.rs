//! Who may call what: authentication and roles, checked in one layer in
//! front of every service.
//!
//! A caller proves who it is with one of:
//! - a **static token** (`authorization: Bearer <token>`), listed in a
//!   tokens file by its SHA-256 only, so the file is no secret
//!   ([`TokenFile`]; `waymark token new` makes one);
//! - a **JWT** (`authorization: Bearer <jwt>`) signed by a key of a JWKS
//!   file, with the configured issuer and audience, not expired
//!   ([`JwtConfig`]); its roles come from the `roles` claim (an array) and
//!   from the `scope` claim (space-separated);
//! - a **client certificate** (mutual TLS), whose subject common name or
//!   a DNS name is granted roles.
//!
//! Each rpc needs one [`Role`]: `query` for `waymark.v1.Query`, `ingest`
//! for `waymark.v1.Ingest`, `admin` for `waymark.v1.Admin`. Health and
//! reflection are open unless configured otherwise; anything else needs an
//! authenticated caller.
//!
//! # Guarantees
//! - No credentials, or credentials that do not verify (unknown token, bad
//!   signature, expired, wrong issuer or audience, a JWT without a usable
//!   key): `UNAUTHENTICATED`, with the reason, before any service runs.
//! - A verified caller without the rpc's role: `PERMISSION_DENIED`, naming
//!   the role.
//! - Tokens are compared by their SHA-256; no token is logged.
//! - A bearer credential, when sent, is what counts: a client certificate
//!   does not rescue a bad token.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use tonic::Status;
use waymark_tls::ClientIdentity;

/// A permission, granted to identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `waymark.v1.Query`: read projections.
    Query,
    /// `waymark.v1.Ingest`: publish events.
    Ingest,
    /// `waymark.v1.Admin`: dead letters, replays, versions, verification.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Query, Role::Ingest, Role::Admin];

    /// Its name in files, claims and flags.
    pub fn name(self) -> &'static str {
        match self {
            Role::Query => "query",
            Role::Ingest => "ingest",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of roles.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    /// Whether `role` is in the set.
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// The set with `role` added.
    pub fn with(self, role: Role) -> Roles {
        Roles(self.0 | role.bit())
    }

    /// Parses a comma-separated list such as `query,ingest`.
    ///
    /// # Errors
    /// On an unknown role or an empty list.
    pub fn parse(list: &str) -> Result<Roles, String> {
        let mut roles = Roles::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let role = Role::parse(name)
                .ok_or_else(|| format!("unknown role {name:?} (roles: query, ingest, admin)"))?;
            roles = roles.with(role);
        }
        if roles == Roles::default() {
            return Err(format!("{list:?} names no role"));
        }
        Ok(roles)
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|r| self.contains(*r))
            .map(Role::name)
            .collect();
        write!(f, "{}", names.join(","))
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name, the JWT's `sub`, or the certificate's name.
    pub name: String,
    /// What it may do.
    pub roles: Roles,
}

/// The SHA-256 of a token, as the tokens file lists it: `sha256:<hex>`.
pub fn token_digest(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Static tokens: one per line, `sha256:<hex> <name> <roles>`, where roles
/// is comma-separated; `#` starts a comment.
#[derive(Debug, Clone, Default)]
pub struct TokenFile {
    by_digest: HashMap<String, Identity>,
}

impl TokenFile {
    /// Parses the text of a tokens file.
    ///
    /// # Errors
    /// Every malformed line, with its number.
    pub fn parse(text: &str) -> Result<TokenFile, String> {
        let mut by_digest = HashMap::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [digest, name, roles] = fields[..] else {
                problems.push(format!(
                    "line {}: expected `sha256:<hex> <name> <roles>`",
                    n + 1
                ));
                continue;
            };
            let hex = digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!(
                    "line {}: {digest:?} is not sha256:<64 hex digits> (store the token's digest, never the token; `waymark token new` prints the line)",
                    n + 1
                ));
                continue;
            }
            match Roles::parse(roles) {
                Ok(roles) => {
                    by_digest.insert(
                        format!("sha256:{}", hex.to_ascii_lowercase()),
                        Identity {
                            name: name.to_owned(),
                            roles,
                        },
                    );
                }
                Err(e) => problems.push(format!("line {}: {e}", n + 1)),
            }
        }
        if problems.is_empty() {
            Ok(TokenFile { by_digest })
        } else {
            Err(problems.join("; "))
        }
    }

    /// How many tokens it lists.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    fn identify(&self, token: &str) -> Option<&Identity> {
        self.by_digest.get(&token_digest(token))
    }
}

/// Where JWTs are verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// A JWKS file (`{"keys": [...]}`) with the issuer's public keys.
    pub jwks: PathBuf,
    /// The required `iss`.
    pub issuer: String,
    /// The required `aud` (one of them, when it is an array).
    pub audience: String,
}

/// Everything the layer checks, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// The static tokens file.
    pub tokens: Option<PathBuf>,
    /// JWT verification.
    pub jwt: Option<JwtConfig>,
    /// Roles of client certificates, by subject common name or DNS name.
    pub certificate_roles: Vec<(String, Roles)>,
    /// Health checks need an authenticated caller too.
    pub protect_health: bool,
    /// Reflection needs an authenticated caller too.
    pub protect_reflection: bool,
}

impl AuthConfig {
    /// Whether any way to authenticate is configured.
    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some() || self.jwt.is_some() || !self.certificate_roles.is_empty()
    }
}

/// Why the authentication configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct AuthConfigError {
    path: String,
    what: String,
}

struct Jwt {
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
    issuer: String,
    audience: String,
}

/// Checks credentials against an [`AuthConfig`].
pub struct Authenticator {
    enabled: bool,
    tokens: TokenFile,
    jwt: Option<Jwt>,
    certificates: HashMap<String, Roles>,
    protect_health: bool,
    protect_reflection: bool,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.as_ref().map(|j| j.keys.len()))
            .field("certificates", &self.certificates)
            .finish()
    }
}

/// What an rpc needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Authenticated,
    Role(Role),
}

impl Authenticator {
    /// Everyone may do everything (loopback development).
    pub fn open() -> Authenticator {
        Authenticator {
            enabled: false,
            tokens: TokenFile::default(),
            jwt: None,
            certificates: HashMap::new(),
            protect_health: false,
            protect_reflection: false,
        }
    }

    /// Reads the files of `config`.
    ///
    /// # Errors
    /// When a file cannot be read or parsed, or the JWKS has no usable key.
    pub fn load(config: &AuthConfig) -> Result<Authenticator, AuthConfigError> {
        let tokens = match &config.tokens {
            None => TokenFile::default(),
            Some(path) => TokenFile::parse(&read(path)?).map_err(|what| AuthConfigError {
                path: path.display().to_string(),
                what,
            })?,
        };
        let jwt = config.jwt.as_ref().map(load_jwks).transpose()?;
        Ok(Authenticator {
            enabled: config.is_enabled(),
            tokens,
            jwt,
            certificates: config.certificate_roles.iter().cloned().collect(),
            protect_health: config.protect_health,
            protect_reflection: config.protect_reflection,
        })
    }

    /// Whether credentials are checked at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn need(&self, path: &str) -> Need {
        if path.starts_with("/waymark.v1.Query/") {
            Need::Role(Role::Query)
        } else if path.starts_with("/waymark.v1.Ingest/") {
            Need::Role(Role::Ingest)
        } else if path.starts_with("/waymark.v1.Admin/") {
            Need::Role(Role::Admin)
        } else if path.starts_with("/grpc.health.v1.Health/") {
            if self.protect_health {
                Need::Authenticated
            } else {
                Need::Nothing
            }
        } else if path.starts_with("/grpc.reflection.") {
            if self.protect_reflection {
                Need::Authenticated
            } else {
                Need::Nothing
            }
        } else {
            Need::Authenticated
        }
    }

    /// Checks a call to `path` with `headers`, from a client that
    /// presented `certificate` (verified by the TLS layer).
    ///
    /// # Errors
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, with the reason.
    pub fn check(
        &self,
        path: &str,
        headers: &HeaderMap,
        certificate: Option<&ClientIdentity>,
    ) -> Result<(), Status> {
        if !self.enabled {
            return Ok(());
        }
        let need = self.need(path);
        if need == Need::Nothing {
            return Ok(());
        }
        let identity = self.authenticate(headers, certificate)?;
        match need {
            Need::Role(role) if !identity.roles.contains(role) => {
                Err(Status::permission_denied(format!(
                    "{} may not call {path}: it needs the role {:?} (it has {})",
                    identity.name,
                    role.name(),
                    if identity.roles == Roles::default() {
                        "none".to_owned()
                    } else {
                        identity.roles.to_string()
                    }
                )))
            }
            _ => Ok(()),
        }
    }

    /// Who the caller is.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` with the reason.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        certificate: Option<&ClientIdentity>,
    ) -> Result<Identity, Status> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
            let (scheme, credential) = value.trim().split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("bearer") || credential.trim().is_empty() {
                return Err(Status::unauthenticated(
                    "the authorization header must be `Bearer <token>`",
                ));
            }
            return self.bearer(credential.trim());
        }
        if let Some(cert) = certificate {
            if let Some((name, roles)) = cert
                .names()
                .find_map(|n| self.certificates.get(n).map(|r| (n, *r)))
            {
                return Ok(Identity {
                    name: format!("certificate {name}"),
                    roles,
                });
            }
            return Err(Status::unauthenticated(format!(
                "no role is granted to the client certificate {:?} and no bearer token was sent",
                cert.names().collect::<Vec<_>>()
            )));
        }
        Err(Status::unauthenticated(
            "credentials required: send `authorization: Bearer <token>`",
        ))
    }

    fn bearer(&self, credential: &str) -> Result<Identity, Status> {
        if let Some(identity) = self.tokens.identify(credential) {
            return Ok(identity.clone());
        }
        let looks_like_jwt = credential.split('.').count() == 3;
        match (&self.jwt, looks_like_jwt) {
            (Some(jwt), true) => jwt.verify(credential),
            (None, true) => Err(Status::unauthenticated(
                "a JWT was sent but this server verifies no JWTs",
            )),
            _ => Err(Status::unauthenticated("unknown token")),
        }
    }
}

impl Jwt {
    fn verify(&self, token: &str) -> Result<Identity, Status> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Status::unauthenticated(format!("malformed JWT: {e}")))?;
        let (_, key, alg) = self
            .keys
            .iter()
            .find(|(kid, _, alg)| {
                *alg == header.alg
                    && (header.kid.is_none() || kid.as_deref() == header.kid.as_deref())
            })
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "no key of the JWKS matches the JWT (alg {:?}, kid {:?})",
                    header.alg, header.kid
                ))
            })?;
        let mut validation = Validation::new(*alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the JWT has expired".to_owned(),
                    ErrorKind::ImmatureSignature => "the JWT is not valid yet".to_owned(),
                    ErrorKind::InvalidAudience => {
                        format!("the JWT is not for this audience ({:?})", self.audience)
                    }
                    ErrorKind::InvalidIssuer => {
                        format!("the JWT is not from the issuer {:?}", self.issuer)
                    }
                    ErrorKind::InvalidSignature => "the JWT's signature does not verify".to_owned(),
                    ErrorKind::MissingRequiredClaim(c) => format!("the JWT has no {c:?} claim"),
                    _ => format!("the JWT does not verify: {e}"),
                };
                Status::unauthenticated(why)
            })?;
        let claims = data.claims;
        let name = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned();
        let mut roles = Roles::default();
        if let Some(list) = claims.get("roles").and_then(|r| r.as_array()) {
            for role in list
                .iter()
                .filter_map(|r| r.as_str())
                .filter_map(Role::parse)
            {
                roles = roles.with(role);
            }
        }
        if let Some(scope) = claims.get("scope").and_then(|s| s.as_str()) {
            for role in scope.split_whitespace().filter_map(Role::parse) {
                roles = roles.with(role);
            }
        }
        Ok(Identity {
            name: format!("jwt {name}"),
            roles,
        })
    }
}

fn read(path: &Path) -> Result<String, AuthConfigError> {
    std::fs::read_to_string(path).map_err(|e| AuthConfigError {
        path: path.display().to_string(),
        what: e.to_string(),
    })
}

fn load_jwks(config: &JwtConfig) -> Result<Jwt, AuthConfigError> {
    let error = |what: String| AuthConfigError {
        path: config.jwks.display().to_string(),
        what,
    };
    let set: JwkSet = serde_json::from_str(&read(&config.jwks)?)
        .map_err(|e| error(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        // Symmetric keys (HS*) have no place in a file of public keys.
        let alg = match jwk.common.key_algorithm.map(|a| a.to_string()) {
            Some(name) => name
                .parse::<Algorithm>()
                .map_err(|e| error(format!("key {:?}: {e}", jwk.common.key_id)))?,
            None => match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => Algorithm::ES256,
                },
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => {
                    return Err(error(format!(
                        "key {:?} is not a public key (RSA, EC or OKP); a JWKS for Waymark lists public keys only",
                        jwk.common.key_id
                    )))
                }
            },
        };
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(error(format!(
                "key {:?} uses {alg:?}, a symmetric algorithm; a JWKS for Waymark lists public keys only",
                jwk.common.key_id
            )));
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| error(format!("key {:?}: {e}", jwk.common.key_id)))?;
        keys.push((jwk.common.key_id.clone(), key, alg));
    }
    if keys.is_empty() {
        return Err(error("the JWKS has no keys".to_owned()));
    }
    if config.issuer.is_empty() || config.audience.is_empty() {
        return Err(error(
            "a JWKS needs an issuer and an audience to check".to_owned(),
        ));
    }
    Ok(Jwt {
        keys,
        issuer: config.issuer.clone(),
        audience: config.audience.clone(),
    })
}

/// The layer that runs [`Authenticator::check`] before every rpc.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// Checks with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

/// Metric: rpcs refused by the auth layer, by `code`.
pub const REFUSED: &str = "waymark_grpc_auth_refused_total";

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The client certificate of the connection a request came on, if any.
fn client_identity<B>(request: &http::Request<B>) -> Option<ClientIdentity> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    ClientIdentity::from_certificates(&certs)
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.auth.is_enabled() {
            let certificate = client_identity(&request);
            if let Err(status) = self.auth.check(
                request.uri().path(),
                request.headers(),
                certificate.as_ref(),
            ) {
                metrics::counter!(REFUSED, "code" => crate::observe::code_label(status.code()))
                    .increment(1);
                tracing::debug!(path = request.uri().path(), code = ?status.code(), "rpc refused");
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    fn with_tokens(lines: &str) -> Authenticator {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, lines).unwrap();
        Authenticator::load(&AuthConfig {
            tokens: Some(path),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn roles_parse_and_print() {
        let r = Roles::parse("admin, query").unwrap();
        assert!(r.contains(Role::Admin) && r.contains(Role::Query) && !r.contains(Role::Ingest));
        assert_eq!(r.to_string(), "query,admin");
        assert!(Roles::parse("root")
            .unwrap_err()
            .contains("unknown role \"root\""));
        assert!(Roles::parse(",").is_err());
    }

    #[test]
    fn a_tokens_file_holds_digests_only_and_reports_every_bad_line() {
        let good = format!("# ci\n{} ci query,ingest\n", token_digest("s3cret"));
        assert_eq!(TokenFile::parse(&good).unwrap().len(), 1);
        let e =
            TokenFile::parse("s3cret ci query\nsha256:00 x query\nsha256:1234 y\n").unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("line 2") && e.contains("line 3"),
            "{e}"
        );
        assert!(e.contains("never the token"), "{e}");
    }

    #[test]
    fn every_service_needs_its_role() {
        let auth = with_tokens(&format!(
            "{} reader query\n{} operator admin,query,ingest\n",
            token_digest("r"),
            token_digest("o")
        ));
        let reader = headers("Bearer r");
        assert!(auth
            .check("/waymark.v1.Query/GetPerson", &reader, None)
            .is_ok());
        let denied = auth
            .check("/waymark.v1.Admin/StartRebuild", &reader, None)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"admin\""),
            "{}",
            denied.message()
        );
        let denied = auth
            .check("/waymark.v1.Ingest/Publish", &reader, None)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for path in [
            "/waymark.v1.Admin/StartRebuild",
            "/waymark.v1.Ingest/Publish",
            "/waymark.v1.Query/GetPerson",
        ] {
            assert!(
                auth.check(path, &headers("bearer o"), None).is_ok(),
                "{path}"
            );
        }
    }

    #[test]
    fn missing_or_unknown_credentials_are_unauthenticated_and_health_stays_open() {
        let auth = with_tokens(&format!("{} reader query\n", token_digest("r")));
        for h in [
            HeaderMap::new(),
            headers("Bearer nope"),
            headers("Basic cjpy"),
            headers("Bearer "),
        ] {
            let e = auth
                .check("/waymark.v1.Query/GetPerson", &h, None)
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{h:?}");
        }
        let open = HeaderMap::new();
        assert!(auth
            .check("/grpc.health.v1.Health/Check", &open, None)
            .is_ok());
        assert!(auth
            .check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &open,
                None
            )
            .is_ok());
        assert_eq!(
            auth.check("/some.Other/Call", &open, None)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn health_and_reflection_can_be_protected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{} reader query\n", token_digest("r"))).unwrap();
        let auth = Authenticator::load(&AuthConfig {
            tokens: Some(path),
            protect_health: true,
            protect_reflection: true,
            ..AuthConfig::default()
        })
        .unwrap();
        let e = auth
            .check("/grpc.health.v1.Health/Check", &HeaderMap::new(), None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Any authenticated caller, whatever its roles.
        assert!(auth
            .check("/grpc.health.v1.Health/Check", &headers("Bearer r"), None)
            .is_ok());
    }

    #[test]
    fn client_certificates_map_to_roles_and_a_bad_token_is_not_rescued() {
        let auth = Authenticator::load(&AuthConfig {
            certificate_roles: vec![("replayer".to_owned(), Roles::parse("admin").unwrap())],
            ..AuthConfig::default()
        })
        .unwrap();
        let cert = ClientIdentity {
            common_name: Some("replayer".to_owned()),
            dns_names: vec![],
        };
        let stranger = ClientIdentity {
            common_name: Some("stranger".to_owned()),
            dns_names: vec![],
        };
        let none = HeaderMap::new();
        assert!(auth
            .check("/waymark.v1.Admin/Verify", &none, Some(&cert))
            .is_ok());
        assert_eq!(
            auth.check("/waymark.v1.Query/GetPerson", &none, Some(&cert))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            auth.check("/waymark.v1.Admin/Verify", &none, Some(&stranger))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(
                "/waymark.v1.Admin/Verify",
                &headers("Bearer x"),
                Some(&cert)
            )
            .unwrap_err()
            .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn an_open_authenticator_lets_everything_through() {
        let auth = Authenticator::open();
        assert!(!auth.is_enabled());
        assert!(auth
            .check("/waymark.v1.Admin/DropVersion", &HeaderMap::new(), None)
            .is_ok());
    }
}
