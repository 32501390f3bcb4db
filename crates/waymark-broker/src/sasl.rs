//! SASL authentication of Kafka clients, server side: the handshake of
//! KIP-43 (`SaslHandshake` v0 and v1) and the framed exchange of KIP-152
//! (`SaslAuthenticate` v0 to v2), with the mechanisms `PLAIN` (RFC 4616)
//! and `SCRAM-SHA-256` / `SCRAM-SHA-512` (RFC 5802, RFC 7677).
//!
//! Passwords are given in plain text ([`SaslConfig`]) and turned into
//! verifiers once, when the broker starts; the plain text is not kept:
//! - SCRAM: a random 32-byte salt per user and mechanism, 4096 PBKDF2
//!   iterations (RFC 7677's minimum, Kafka's default), then only StoredKey
//!   and ServerKey (RFC 5802 §3).
//! - PLAIN: an HMAC-SHA-256 of the password under a random key of this
//!   process, compared in constant time.
//!
//! An unknown user cannot be told from a wrong password: PLAIN verifies
//! against a verifier all the same, and SCRAM goes through the whole
//! exchange with a salt derived from the name (the same at every attempt,
//! as a real one is) and fails at the proof, with the same message.
//!
//! The legacy flow of `SaslHandshake` v0 (raw SASL tokens, each in a
//! length-prefixed frame without a Kafka header, until authenticated) is
//! served too: it is the same state machine with other framing.
//!
//! Not supported: channel binding (the `-PLUS` mechanisms), SCRAM
//! extensions such as Kafka's delegation tokens (`tokenauth=true`), and
//! SASLprep: as in Kafka, names and passwords are compared as their UTF-8
//! bytes.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{SaslAuthenticateResponse, SaslHandshakeResponse};
use kafka_protocol::protocol::StrBytes;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac, pbkdf2};
use subtle::ConstantTimeEq;
use tracing::{debug, info};

use crate::api::str_bytes;
use crate::{Counters, AUTH_FAILURES};

/// A SASL mechanism the broker can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// `PLAIN` (RFC 4616): the password travels as is; use it over TLS.
    Plain,
    /// `SCRAM-SHA-256` (RFC 7677).
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// Every mechanism, in the order a handshake lists them.
    pub const ALL: [SaslMechanism; 3] = [
        SaslMechanism::ScramSha512,
        SaslMechanism::ScramSha256,
        SaslMechanism::Plain,
    ];

    /// Its name in Kafka (`sasl.mechanism`).
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// The mechanism of a Kafka name (exact, as Kafka compares them).
    pub fn from_name(name: &str) -> Option<SaslMechanism> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    fn scram(self) -> Option<ScramHash> {
        match self {
            SaslMechanism::Plain => None,
            SaslMechanism::ScramSha256 => Some(ScramHash::Sha256),
            SaslMechanism::ScramSha512 => Some(ScramHash::Sha512),
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mechanism name the broker does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown SASL mechanism {0:?} (known: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)")]
pub struct UnknownMechanism(pub String);

impl FromStr for SaslMechanism {
    type Err = UnknownMechanism;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s).ok_or_else(|| UnknownMechanism(s.to_owned()))
    }
}

/// Who may connect when SASL is on, and with which mechanisms. Its
/// `Debug` lists user names, never passwords.
#[derive(Clone)]
pub struct SaslConfig {
    /// User name → password.
    pub users: HashMap<String, String>,
    /// The mechanisms offered (at least one).
    pub mechanisms: Vec<SaslMechanism>,
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&str> = self.users.keys().map(String::as_str).collect();
        users.sort_unstable();
        f.debug_struct("SaslConfig")
            .field("users", &users)
            .field("passwords", &"<redacted>")
            .field("mechanisms", &self.mechanisms)
            .finish()
    }
}

/// Why a SASL configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaslConfigError {
    /// The users file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Lines of a users file that do not parse (every one, with its number;
    /// never its password).
    #[error("{path}: {problems}")]
    Users {
        /// The file (`-` for text parsed directly).
        path: String,
        /// What is wrong, line by line.
        problems: String,
    },
    /// SASL is on but offers no mechanism.
    #[error("SASL is enabled with no mechanism")]
    NoMechanism,
    /// A user that no client could authenticate as.
    #[error("SASL user {0:?}: {1}")]
    User(String, &'static str),
    /// The system's random number generator failed.
    #[error("no secure random numbers for SASL salts and nonces")]
    Random,
}

impl SaslConfig {
    /// `users` with every mechanism ([`SaslMechanism::ALL`]).
    pub fn new(users: HashMap<String, String>) -> Self {
        Self {
            users,
            mechanisms: SaslMechanism::ALL.to_vec(),
        }
    }

    /// Adds (or replaces) a user.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.insert(name.into(), password.into());
        self
    }

    /// Offers only `mechanisms`.
    pub fn with_mechanisms(mut self, mechanisms: impl IntoIterator<Item = SaslMechanism>) -> Self {
        self.mechanisms = mechanisms.into_iter().collect();
        self.mechanisms.dedup();
        self
    }

    /// Parses a users file: one `name:password` per line (the password is
    /// everything after the first `:`, as is: spaces, `:` and `#`
    /// included); blank lines and lines starting with `#` are skipped.
    /// Every mechanism is offered.
    ///
    /// # Errors
    /// Every malformed line (no `:`, an empty name or password, a NUL, a
    /// name given twice), with its number.
    pub fn parse_users(text: &str) -> Result<Self, SaslConfigError> {
        Self::parse_users_of(text, "-")
    }

    /// Reads and parses a users file ([`SaslConfig::parse_users`]).
    ///
    /// # Errors
    /// An unreadable file, or malformed lines.
    pub fn load_users(path: &Path) -> Result<Self, SaslConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SaslConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_users_of(&text, &path.display().to_string())
    }

    fn parse_users_of(text: &str, path: &str) -> Result<Self, SaslConfigError> {
        let mut users = HashMap::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, password)) = line.split_once(':') else {
                problems.push(format!("line {n}: expected `name:password`"));
                continue;
            };
            if let Err(why) = check_user(name, password) {
                problems.push(format!("line {n}: {why}"));
            } else if users.insert(name.to_owned(), password.to_owned()).is_some() {
                problems.push(format!("line {n}: user {name:?} is given twice"));
            }
        }
        if !problems.is_empty() {
            return Err(SaslConfigError::Users {
                path: path.to_owned(),
                problems: problems.join("; "),
            });
        }
        Ok(Self::new(users))
    }
}

fn check_user(name: &str, password: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty user name");
    }
    if password.is_empty() {
        return Err("empty password");
    }
    if name.contains('\0') || password.contains('\0') {
        return Err("a NUL character (PLAIN cannot carry it)");
    }
    Ok(())
}

/// PBKDF2 iterations of SCRAM salted passwords.
pub const SCRAM_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// What the client is told when its credentials do not verify; the same
/// for an unknown user and a wrong password.
pub(crate) const BAD_CREDENTIALS: &str = "Authentication failed: Invalid username or password";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn hmac(self) -> hmac::Algorithm {
        match self {
            ScramHash::Sha256 => hmac::HMAC_SHA256,
            ScramHash::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            ScramHash::Sha256 => &digest::SHA256,
            ScramHash::Sha512 => &digest::SHA512,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            ScramHash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            ScramHash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn len(self) -> usize {
        self.digest().output_len()
    }

    fn mac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(self.hmac(), key), data)
            .as_ref()
            .to_vec()
    }

    fn mechanism(self) -> SaslMechanism {
        match self {
            ScramHash::Sha256 => SaslMechanism::ScramSha256,
            ScramHash::Sha512 => SaslMechanism::ScramSha512,
        }
    }
}

/// A user's SCRAM verifier (RFC 5802 §3): no password, no salted password.
#[derive(Clone)]
struct ScramCredential {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl ScramCredential {
    fn derive(hash: ScramHash, password: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let mut salted = vec![0u8; hash.len()];
        let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(hash.pbkdf2(), rounds, &salt, password, &mut salted);
        let client_key = hash.mac(&salted, b"Client Key");
        let stored_key = digest::digest(hash.digest(), &client_key).as_ref().to_vec();
        let server_key = hash.mac(&salted, b"Server Key");
        Self {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// The verifiers of one user.
struct Verifiers {
    /// HMAC-SHA-256 of the password under [`Authenticator::pepper`].
    plain: Option<Vec<u8>>,
    sha256: Option<ScramCredential>,
    sha512: Option<ScramCredential>,
}

impl Verifiers {
    fn scram(&self, hash: ScramHash) -> Option<&ScramCredential> {
        match hash {
            ScramHash::Sha256 => self.sha256.as_ref(),
            ScramHash::Sha512 => self.sha512.as_ref(),
        }
    }
}

/// The broker's verifiers, built once from a [`SaslConfig`].
pub(crate) struct Authenticator {
    mechanisms: Vec<SaslMechanism>,
    users: HashMap<String, Verifiers>,
    /// A random key of this process: PLAIN verifiers and the salts of
    /// unknown users.
    pepper: hmac::Key,
    /// Compared against when a PLAIN user is unknown, so that the answer
    /// takes as long.
    dummy_plain: Vec<u8>,
    rng: SystemRandom,
}

impl Authenticator {
    /// Derives every verifier (PBKDF2 for each user and SCRAM mechanism:
    /// a few milliseconds per user) and drops the passwords.
    pub(crate) fn new(config: SaslConfig) -> Result<Self, SaslConfigError> {
        let SaslConfig {
            users,
            mut mechanisms,
        } = config;
        mechanisms.sort_by_key(|m| SaslMechanism::ALL.iter().position(|a| a == m));
        mechanisms.dedup();
        if mechanisms.is_empty() {
            return Err(SaslConfigError::NoMechanism);
        }
        let rng = SystemRandom::new();
        let pepper =
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| SaslConfigError::Random)?;
        let salt = || -> Result<Vec<u8>, SaslConfigError> {
            let mut salt = vec![0u8; SALT_LEN];
            rng.fill(&mut salt).map_err(|_| SaslConfigError::Random)?;
            Ok(salt)
        };
        let mut verifiers = HashMap::with_capacity(users.len());
        for (name, password) in users {
            check_user(&name, &password).map_err(|why| SaslConfigError::User(name.clone(), why))?;
            let on = |m| mechanisms.contains(&m);
            let scram = |hash: ScramHash| -> Result<_, SaslConfigError> {
                Ok(on(hash.mechanism()).then_some(ScramCredential::derive(
                    hash,
                    password.as_bytes(),
                    salt()?,
                    SCRAM_ITERATIONS,
                )))
            };
            let v = Verifiers {
                plain: on(SaslMechanism::Plain)
                    .then(|| hmac::sign(&pepper, password.as_bytes()).as_ref().to_vec()),
                sha256: scram(ScramHash::Sha256)?,
                sha512: scram(ScramHash::Sha512)?,
            };
            verifiers.insert(name, v);
        }
        let dummy_plain = hmac::sign(&pepper, b"no such user").as_ref().to_vec();
        Ok(Self {
            mechanisms,
            users: verifiers,
            pepper,
            dummy_plain,
            rng,
        })
    }

    /// The mechanisms offered, as a handshake lists them.
    pub(crate) fn mechanism_names(&self) -> Vec<StrBytes> {
        self.mechanisms
            .iter()
            .map(|m| StrBytes::from_static_str(m.name()))
            .collect()
    }

    /// Verifies a PLAIN message (`authzid NUL authcid NUL passwd`).
    fn plain(&self, token: &[u8]) -> Result<String, Failure> {
        let malformed = |why| Failure::malformed(SaslMechanism::Plain, why);
        let mut parts = token.split(|b| *b == 0);
        let (Some(authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not authzid NUL user NUL password"));
        };
        let user = std::str::from_utf8(user).map_err(|_| malformed("user name not UTF-8"))?;
        if user.is_empty() {
            return Err(malformed("empty user name"));
        }
        if !authzid.is_empty() && authzid != user.as_bytes() {
            return Err(Failure {
                mechanism: SaslMechanism::Plain,
                user: Some(user.to_owned()),
                message: "Authentication failed: the authorization id differs from the user name",
                why: "authorization id differs from the user name",
            });
        }
        let verifier = self.users.get(user).and_then(|v| v.plain.as_deref());
        let ok = match verifier {
            Some(tag) => hmac::verify(&self.pepper, password, tag).is_ok(),
            None => {
                let _ = hmac::verify(&self.pepper, password, &self.dummy_plain);
                false
            }
        };
        if ok {
            Ok(user.to_owned())
        } else {
            Err(Failure::credentials(
                SaslMechanism::Plain,
                user,
                if verifier.is_some() {
                    "wrong password"
                } else {
                    "unknown user"
                },
            ))
        }
    }

    /// Answers a SCRAM client-first message.
    fn scram_first(&self, hash: ScramHash, token: &[u8]) -> Result<ScramExchange, Failure> {
        let mechanism = hash.mechanism();
        let message = std::str::from_utf8(token)
            .map_err(|_| Failure::malformed(mechanism, "client-first message not UTF-8"))?;
        let first =
            ClientFirst::parse(message).map_err(|why| Failure::malformed(mechanism, why))?;
        let (credential, known) = match self.users.get(&first.user).and_then(|v| v.scram(hash)) {
            Some(c) => (c.clone(), true),
            None => (self.unknown_user(hash, &first.user), false),
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| Failure {
            mechanism,
            user: Some(first.user.clone()),
            message: "Authentication failed: server error",
            why: "no random numbers for a nonce",
        })?;
        Ok(ScramExchange::start(
            hash,
            first,
            credential,
            known,
            &B64.encode(nonce),
        ))
    }

    /// A credential for a user that does not exist: its salt is derived
    /// from the name (the same at every attempt), its keys verify nothing.
    fn unknown_user(&self, hash: ScramHash, user: &str) -> ScramCredential {
        let mac = |what: &str| {
            let data = format!("{what}\0{}\0{user}", hash.mechanism().name());
            hmac::sign(&self.pepper, data.as_bytes()).as_ref().to_vec()
        };
        ScramCredential {
            salt: mac("salt"),
            iterations: SCRAM_ITERATIONS,
            stored_key: mac("stored key"),
            server_key: mac("server key"),
        }
    }
}

/// The parts of a SCRAM client-first message (RFC 5802 §7).
struct ClientFirst {
    gs2_header: String,
    bare: String,
    user: String,
    nonce: String,
}

impl ClientFirst {
    fn parse(message: &str) -> Result<Self, &'static str> {
        let (flag, rest) = message.split_once(',').ok_or("no GS2 header")?;
        match flag {
            // "y": the client could bind channels but thinks we cannot
            // (true: no -PLUS mechanism is offered).
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err("channel binding is not supported"),
            _ => return Err("bad GS2 channel binding flag"),
        }
        let (authzid, bare) = rest.split_once(',').ok_or("no GS2 header")?;
        let gs2_header = &message[..message.len() - bare.len()];
        let mut fields = bare.split(',');
        let name = fields.next().unwrap_or_default();
        if name.starts_with("m=") {
            return Err("mandatory extensions are not supported");
        }
        let user = decode_saslname(name.strip_prefix("n=").ok_or("no user name")?)?;
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or("no client nonce")?;
        if nonce.is_empty()
            || !nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err("bad client nonce");
        }
        for extension in fields {
            if extension == "tokenauth=true" {
                return Err("delegation tokens are not supported");
            }
        }
        if !authzid.is_empty() {
            let authzid = decode_saslname(authzid.strip_prefix("a=").ok_or("bad authzid")?)?;
            if authzid != user {
                return Err("the authorization id differs from the user name");
            }
        }
        Ok(Self {
            gs2_header: gs2_header.to_owned(),
            bare: bare.to_owned(),
            user,
            nonce: nonce.to_owned(),
        })
    }
}

/// A `saslname`: `=2C` is `,` and `=3D` is `=`.
fn decode_saslname(name: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).ok_or("bad escape in a name")?;
        out.push(match escape {
            "=2C" => ',',
            "=3D" => '=',
            _ => return Err("bad escape in a name"),
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err("empty user name");
    }
    Ok(out)
}

/// A SCRAM exchange after the server-first message.
struct ScramExchange {
    hash: ScramHash,
    user: String,
    credential: ScramCredential,
    known: bool,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramExchange {
    fn start(
        hash: ScramHash,
        first: ClientFirst,
        credential: ScramCredential,
        known: bool,
        server_nonce: &str,
    ) -> Self {
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        Self {
            hash,
            user: first.user,
            credential,
            known,
            gs2_header: first.gs2_header,
            client_first_bare: first.bare,
            server_first,
            nonce,
        }
    }

    /// Verifies the client-final message; the server-final message
    /// (`v=ServerSignature`) when the proof is right.
    fn finish(&self, token: &[u8]) -> Result<String, Failure> {
        let mechanism = self.hash.mechanism();
        let malformed = |why| Failure {
            user: Some(self.user.clone()),
            ..Failure::malformed(mechanism, why)
        };
        let message =
            std::str::from_utf8(token).map_err(|_| malformed("client-final message not UTF-8"))?;
        let (without_proof, proof) = message.rsplit_once(",p=").ok_or(malformed("no proof"))?;
        let proof = B64
            .decode(proof)
            .map_err(|_| malformed("proof not base64"))?;
        if proof.len() != self.hash.len() {
            return Err(malformed("proof of the wrong length"));
        }
        let mut fields = without_proof.split(',');
        let binding = fields
            .next()
            .and_then(|f| f.strip_prefix("c="))
            .ok_or(malformed("no channel binding"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(malformed("channel binding differs from the GS2 header"));
        }
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(malformed("no nonce"))?;
        if nonce != self.nonce {
            return Err(malformed("nonce differs from the server's"));
        }
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = self
            .hash
            .mac(&self.credential.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let stored_key = digest::digest(self.hash.digest(), &client_key);
        let matches: bool = stored_key
            .as_ref()
            .ct_eq(&self.credential.stored_key)
            .into();
        if !(matches && self.known) {
            return Err(Failure::credentials(
                mechanism,
                &self.user,
                if self.known {
                    "wrong password"
                } else {
                    "unknown user"
                },
            ));
        }
        let server_signature = self
            .hash
            .mac(&self.credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// A refused authentication.
#[derive(Debug)]
struct Failure {
    mechanism: SaslMechanism,
    /// The user it was for, if the message named one.
    user: Option<String>,
    /// What the client is told.
    message: &'static str,
    /// What the log is told.
    why: &'static str,
}

impl Failure {
    fn malformed(mechanism: SaslMechanism, why: &'static str) -> Self {
        Self {
            mechanism,
            user: None,
            message: match mechanism {
                SaslMechanism::Plain => "Authentication failed: malformed PLAIN message",
                _ => "Authentication failed: malformed SCRAM message",
            },
            why,
        }
    }

    fn credentials(mechanism: SaslMechanism, user: &str, why: &'static str) -> Self {
        Self {
            mechanism,
            user: Some(user.to_owned()),
            message: BAD_CREDENTIALS,
            why,
        }
    }
}

/// One step of an exchange.
enum Step {
    /// Send this token and wait for the next.
    Continue(Vec<u8>),
    /// Authenticated; send this last token.
    Done(Vec<u8>),
    /// Refused.
    Failed(Failure),
}

enum State {
    /// Before the handshake.
    Start,
    /// A mechanism was chosen; its first token is next.
    Chosen {
        mechanism: SaslMechanism,
        legacy: bool,
    },
    /// SCRAM after the server-first message.
    Scram {
        exchange: Box<ScramExchange>,
        legacy: bool,
    },
    /// Authenticated.
    Done,
    /// Refused; the connection is being closed.
    Failed,
}

/// The authentication of one connection.
pub(crate) struct Session {
    auth: Arc<Authenticator>,
    state: State,
    peer: SocketAddr,
}

impl Session {
    pub(crate) fn new(auth: Arc<Authenticator>, peer: SocketAddr) -> Self {
        Self {
            auth,
            state: State::Start,
            peer,
        }
    }

    /// Whether the connection has authenticated.
    pub(crate) fn authenticated(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the next frame is a raw SASL token (after a v0 handshake).
    pub(crate) fn wants_raw_token(&self) -> bool {
        matches!(
            self.state,
            State::Chosen { legacy: true, .. } | State::Scram { legacy: true, .. }
        )
    }

    /// Answers a `SaslHandshake`; `true`: close after the answer.
    pub(crate) fn handshake(
        &mut self,
        mechanism: &str,
        version: i16,
        counters: &Counters,
    ) -> (SaslHandshakeResponse, bool) {
        let response =
            SaslHandshakeResponse::default().with_mechanisms(self.auth.mechanism_names());
        let peer = self.peer;
        if !matches!(self.state, State::Start) {
            self.state = State::Failed;
            counters.refused(
                "ILLEGAL_SASL_STATE",
                &format!("{peer}: SaslHandshake during an authentication; connection closed"),
            );
            return (
                response.with_error_code(ResponseError::IllegalSaslState.code()),
                true,
            );
        }
        match SaslMechanism::from_name(mechanism).filter(|m| self.auth.mechanisms.contains(m)) {
            Some(mechanism) => {
                self.state = State::Chosen {
                    mechanism,
                    legacy: version == 0,
                };
                (response, false)
            }
            None => {
                self.state = State::Failed;
                counters.refused(
                    "UNSUPPORTED_SASL_MECHANISM",
                    &format!("{peer}: SASL mechanism {mechanism:?} asked for; connection closed"),
                );
                debug!(%peer, mechanism, "kafka endpoint: unsupported SASL mechanism");
                (
                    response.with_error_code(ResponseError::UnsupportedSaslMechanism.code()),
                    true,
                )
            }
        }
    }

    /// Answers a `SaslAuthenticate`; `true`: close after the answer.
    pub(crate) fn authenticate(
        &mut self,
        token: &[u8],
        counters: &Counters,
    ) -> (SaslAuthenticateResponse, bool) {
        // A null message unless refused, as Kafka answers.
        let response = SaslAuthenticateResponse::default().with_error_message(None);
        if !matches!(self.state, State::Chosen { .. } | State::Scram { .. }) {
            self.state = State::Failed;
            counters.refused(
                "ILLEGAL_SASL_STATE",
                &format!(
                    "{}: SaslAuthenticate without a SaslHandshake; connection closed",
                    self.peer
                ),
            );
            return (
                response
                    .with_error_code(ResponseError::IllegalSaslState.code())
                    .with_error_message(Some(str_bytes("SaslAuthenticate before SaslHandshake"))),
                true,
            );
        }
        match self.step(token) {
            Step::Continue(token) => (response.with_auth_bytes(token.into()), false),
            // No re-authentication is asked for: session_lifetime_ms = 0.
            Step::Done(token) => (
                response
                    .with_auth_bytes(token.into())
                    .with_session_lifetime_ms(0),
                false,
            ),
            Step::Failed(failure) => {
                let message = failure.message;
                self.failed(failure, counters);
                (
                    response
                        .with_error_code(ResponseError::SaslAuthenticationFailed.code())
                        .with_error_message(Some(StrBytes::from_static_str(message))),
                    true,
                )
            }
        }
    }

    /// Handles a raw token of the v0 flow: the frame to answer with
    /// (length-prefixed token), or `None` to close the connection (a
    /// failure has no other answer in that flow).
    pub(crate) fn raw_token(&mut self, token: &[u8], counters: &Counters) -> Option<Bytes> {
        let token = match self.step(token) {
            Step::Continue(token) | Step::Done(token) => token,
            Step::Failed(failure) => {
                self.failed(failure, counters);
                return None;
            }
        };
        let mut frame = BytesMut::with_capacity(4 + token.len());
        frame.put_u32(token.len() as u32);
        frame.put_slice(&token);
        Some(frame.freeze())
    }

    fn step(&mut self, token: &[u8]) -> Step {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Chosen {
                mechanism: SaslMechanism::Plain,
                ..
            } => match self.auth.plain(token) {
                Ok(user) => self.done(SaslMechanism::Plain, &user, Vec::new()),
                Err(f) => Step::Failed(f),
            },
            State::Chosen { mechanism, legacy } => {
                let Some(hash) = mechanism.scram() else {
                    return Step::Failed(Failure::malformed(mechanism, "unknown mechanism"));
                };
                match self.auth.scram_first(hash, token) {
                    Ok(exchange) => {
                        let server_first = exchange.server_first.clone().into_bytes();
                        self.state = State::Scram {
                            exchange: Box::new(exchange),
                            legacy,
                        };
                        Step::Continue(server_first)
                    }
                    Err(f) => Step::Failed(f),
                }
            }
            State::Scram { exchange, .. } => match exchange.finish(token) {
                Ok(server_final) => self.done(
                    exchange.hash.mechanism(),
                    &exchange.user,
                    server_final.into_bytes(),
                ),
                Err(f) => Step::Failed(f),
            },
            other => {
                self.state = other;
                Step::Failed(Failure::malformed(
                    SaslMechanism::Plain,
                    "token out of an exchange",
                ))
            }
        }
    }

    fn done(&mut self, mechanism: SaslMechanism, user: &str, token: Vec<u8>) -> Step {
        self.state = State::Done;
        debug!(peer = %self.peer, %mechanism, user, "kafka endpoint: client authenticated");
        Step::Done(token)
    }

    fn failed(&mut self, failure: Failure, counters: &Counters) {
        self.state = State::Failed;
        let Failure {
            mechanism,
            user,
            why,
            ..
        } = failure;
        let peer = self.peer;
        let user = user.unwrap_or_default();
        metrics::counter!(AUTH_FAILURES, "mechanism" => mechanism.name()).increment(1);
        counters.refused(
            "SASL_AUTHENTICATION_FAILED",
            &format!("{peer}: {mechanism} authentication of {user:?} failed; connection closed"),
        );
        info!(%peer, %mechanism, user, "kafka endpoint: authentication failed");
        debug!(%peer, %mechanism, user, why, "kafka endpoint: why the authentication failed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// Every mechanism, made once (each user costs PBKDF2 rounds).
    fn shared() -> Arc<Authenticator> {
        static SHARED: std::sync::OnceLock<Arc<Authenticator>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| authenticator(&SaslMechanism::ALL))
            .clone()
    }

    fn authenticator(mechanisms: &[SaslMechanism]) -> Arc<Authenticator> {
        let config = SaslConfig::new(HashMap::new())
            .user("alice", "wonder,land=")
            .user("bob", "builder")
            .with_mechanisms(mechanisms.iter().copied());
        Arc::new(Authenticator::new(config).unwrap())
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// A SCRAM client, after RFC 5802 §3.
    struct Client {
        hash: ScramHash,
        password: String,
        nonce: String,
        bare: String,
        auth_message: String,
        server_signature: Vec<u8>,
    }

    impl Client {
        fn new(hash: ScramHash, user: &str, password: &str) -> (Self, String) {
            let nonce = "fyko+d2lbbFgONRv9qkxdawL".to_owned();
            let bare = format!(
                "n={},r={nonce}",
                user.replace('=', "=3D").replace(',', "=2C")
            );
            let client = Self {
                hash,
                password: password.to_owned(),
                nonce,
                bare: bare.clone(),
                auth_message: String::new(),
                server_signature: Vec::new(),
            };
            (client, format!("n,,{bare}"))
        }

        fn last(&mut self, server_first: &str) -> String {
            let mut fields = server_first.split(',');
            let nonce = fields.next().unwrap().strip_prefix("r=").unwrap();
            assert!(nonce.starts_with(&self.nonce));
            let salt = B64
                .decode(fields.next().unwrap().strip_prefix("s=").unwrap())
                .unwrap();
            let i: u32 = fields
                .next()
                .unwrap()
                .strip_prefix("i=")
                .unwrap()
                .parse()
                .unwrap();
            let hash = self.hash;
            let mut salted = vec![0u8; hash.len()];
            pbkdf2::derive(
                hash.pbkdf2(),
                NonZeroU32::new(i).unwrap(),
                &salt,
                self.password.as_bytes(),
                &mut salted,
            );
            let client_key = hash.mac(&salted, b"Client Key");
            let stored_key = digest::digest(hash.digest(), &client_key);
            let without_proof = format!("c=biws,r={nonce}");
            self.auth_message = format!("{},{server_first},{without_proof}", self.bare);
            let signature = hash.mac(stored_key.as_ref(), self.auth_message.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(&signature)
                .map(|(a, b)| a ^ b)
                .collect();
            let server_key = hash.mac(&salted, b"Server Key");
            self.server_signature = hash.mac(&server_key, self.auth_message.as_bytes());
            format!("{without_proof},p={}", B64.encode(proof))
        }
    }

    fn scram(
        mechanism: SaslMechanism,
        user: &str,
        password: &str,
    ) -> (Session, Result<Vec<u8>, (i16, String)>) {
        let counters = Counters::default();
        let hash = mechanism.scram().unwrap();
        let mut s = Session::new(shared(), peer());
        let (r, close) = s.handshake(mechanism.name(), 1, &counters);
        assert_eq!((r.error_code, close), (0, false));
        let (mut client, first) = Client::new(hash, user, password);
        let (r, close) = s.authenticate(first.as_bytes(), &counters);
        assert_eq!((r.error_code, close), (0, false));
        let server_first = String::from_utf8(r.auth_bytes.to_vec()).unwrap();
        let last = client.last(&server_first);
        let (r, close) = s.authenticate(last.as_bytes(), &counters);
        if r.error_code != 0 {
            assert!(close);
            assert!(!s.authenticated());
            return (s, Err((r.error_code, r.error_message.unwrap().to_string())));
        }
        assert!(!close);
        assert!(s.authenticated());
        assert_eq!(
            r.auth_bytes.as_ref(),
            format!("v={}", B64.encode(&client.server_signature)).as_bytes(),
            "the server proves it knows the password too"
        );
        (s, Ok(r.auth_bytes.to_vec()))
    }

    #[test]
    fn rfc_7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let credential = ScramCredential::derive(ScramHash::Sha256, b"pencil", salt, 4096);
        let first = ClientFirst::parse("n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let exchange = ScramExchange::start(
            ScramHash::Sha256,
            first,
            credential,
            true,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        );
        assert_eq!(
            exchange.server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let last = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            exchange.finish(last.as_bytes()).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        // One bit off in the proof.
        let bad = last.replace("dHzb", "dHzc");
        let f = exchange.finish(bad.as_bytes()).unwrap_err();
        assert_eq!(f.message, BAD_CREDENTIALS);
    }

    #[test]
    fn scram_sha_256_and_512_authenticate_the_right_password_only() {
        for mechanism in [SaslMechanism::ScramSha256, SaslMechanism::ScramSha512] {
            // A name and password with the characters SCRAM escapes.
            let (_, ok) = scram(mechanism, "alice", "wonder,land=");
            assert!(ok.is_ok(), "{mechanism}");
            let (_, ok) = scram(mechanism, "bob", "builder");
            assert!(ok.is_ok(), "{mechanism}");
            let (_, wrong) = scram(mechanism, "bob", "Builder");
            let (_, unknown) = scram(mechanism, "carol", "builder");
            let expected = Err((58, BAD_CREDENTIALS.to_owned()));
            assert_eq!(wrong, expected, "{mechanism}");
            assert_eq!(
                unknown, expected,
                "an unknown user is told as a wrong password"
            );
        }
    }

    #[test]
    fn an_unknown_user_gets_a_stable_salt() {
        let auth = shared();
        let first = |user: &str| {
            let msg = format!("n,,n={user},r=abc");
            let exchange = auth.scram_first(ScramHash::Sha512, msg.as_bytes()).unwrap();
            exchange.server_first.split(',').nth(1).unwrap().to_owned()
        };
        assert_eq!(first("carol"), first("carol"));
        assert_ne!(first("carol"), first("dave"));
        assert_eq!(first("bob"), first("bob"));
    }

    #[test]
    fn plain_checks_user_password_and_authzid() {
        let counters = Counters::default();
        let auth = shared();
        let try_plain = |token: &[u8]| {
            let mut s = Session::new(auth.clone(), peer());
            let (r, _) = s.handshake("PLAIN", 1, &counters);
            assert_eq!(r.error_code, 0);
            let (r, close) = s.authenticate(token, &counters);
            (
                r.error_code,
                r.error_message.map(|m| m.to_string()),
                close,
                s.authenticated(),
            )
        };
        assert_eq!(try_plain(b"\0bob\0builder"), (0, None, false, true));
        assert_eq!(try_plain(b"bob\0bob\0builder"), (0, None, false, true));
        let bad = (58, Some(BAD_CREDENTIALS.to_owned()), true, false);
        assert_eq!(try_plain(b"\0bob\0wrong"), bad);
        assert_eq!(try_plain(b"\0nobody\0builder"), bad);
        assert_eq!(try_plain(b"\0bob\0"), bad);
        assert_eq!(try_plain(b"alice\0bob\0builder").0, 58);
        assert_eq!(try_plain(b"bob\0builder").0, 58);
        assert_eq!(try_plain(b"\0bob\0builder\0").0, 58);
        // Counted, by code.
        assert_eq!(
            counters.refusals.load(std::sync::atomic::Ordering::Relaxed),
            6
        );
    }

    #[test]
    fn handshake_offers_the_enabled_mechanisms_and_refuses_others() {
        let counters = Counters::default();
        let auth = authenticator(&[SaslMechanism::ScramSha256]);
        let mut s = Session::new(auth.clone(), peer());
        let (r, close) = s.handshake("PLAIN", 1, &counters);
        assert_eq!(r.error_code, 33);
        assert!(close);
        assert_eq!(
            r.mechanisms,
            vec![StrBytes::from_static_str("SCRAM-SHA-256")]
        );
        let mut s = Session::new(auth.clone(), peer());
        let (r, _) = s.handshake("SCRAM-SHA-256", 0, &counters);
        assert_eq!(r.error_code, 0);
        assert!(s.wants_raw_token());
        // SaslAuthenticate before any handshake.
        let mut s = Session::new(auth, peer());
        let (r, close) = s.authenticate(b"n,,n=a,r=b", &counters);
        assert_eq!((r.error_code, close), (34, true));
    }

    #[test]
    fn names_are_unescaped_and_bad_first_messages_refused() {
        let first = ClientFirst::parse("n,a=a=3Db=2Cc,n=a=3Db=2Cc,r=xyz,ext=1").unwrap();
        assert_eq!(first.user, "a=b,c");
        assert_eq!(first.gs2_header, "n,a=a=3Db=2Cc,");
        assert_eq!(first.bare, "n=a=3Db=2Cc,r=xyz,ext=1");
        assert!(ClientFirst::parse("y,,n=u,r=x").is_ok());
        for bad in [
            "",
            "n",
            "n,",
            "p=tls-unique,,n=u,r=x",
            "n,,m=x,n=u,r=x",
            "n,,n=,r=x",
            "n,,n=u=2,r=x",
            "n,,n=u=41,r=x",
            "n,,n=u",
            "n,,n=u,r=",
            "n,,n=u,x=y",
            "n,a=v,n=u,r=x",
            "n,,n=u,r=x,tokenauth=true",
        ] {
            assert!(ClientFirst::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_passwords() {
        let config = SaslConfig::new(HashMap::new()).user("alice", "s3cr3t-pw");
        let text = format!("{config:?}");
        assert!(text.contains("alice"), "{text}");
        assert!(!text.contains("s3cr3t-pw"), "{text}");
    }

    #[test]
    fn users_files_parse_and_report_every_bad_line() {
        let config = SaslConfig::parse_users(
            "# users\n\nalice:pw with spaces:and#hash\r\n  # indented comment\nbob:b\n",
        )
        .unwrap();
        assert_eq!(config.users.len(), 2);
        assert_eq!(config.users["alice"], "pw with spaces:and#hash");
        assert_eq!(config.users["bob"], "b");
        assert_eq!(config.mechanisms, SaslMechanism::ALL.to_vec());
        let e = SaslConfig::parse_users("nocolon\n:pw\nx:\nbob:1\nbob:secret2\n")
            .unwrap_err()
            .to_string();
        for n in ["line 1", "line 2", "line 3", "line 5"] {
            assert!(e.contains(n), "{e}");
        }
        assert!(!e.contains("line 4"), "{e}");
        assert!(!e.contains("secret2"), "{e}");
        assert!(matches!(
            Authenticator::new(SaslConfig::new(HashMap::new()).with_mechanisms([])),
            Err(SaslConfigError::NoMechanism)
        ));
        assert_eq!(
            "SCRAM-SHA-512".parse::<SaslMechanism>(),
            Ok(SaslMechanism::ScramSha512)
        );
        assert!("scram-sha-512".parse::<SaslMechanism>().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes at any step: an answer, never a panic.
        #[test]
        fn arbitrary_tokens_never_panic(
            first in proptest::collection::vec(any::<u8>(), 0..80),
            last in proptest::collection::vec(any::<u8>(), 0..200),
            m in 0usize..3,
        ) {
            let counters = Counters::default();
            let mut s = Session::new(shared(), peer());
            s.handshake(SaslMechanism::ALL[m].name(), 1, &counters);
            let _ = s.authenticate(&first, &counters);
            let _ = s.authenticate(&last, &counters);
            // And a well-formed first message with an arbitrary last one.
            let mut s = Session::new(shared(), peer());
            s.handshake("SCRAM-SHA-256", 0, &counters);
            prop_assert!(s.raw_token(b"n,,n=bob,r=abc", &counters).is_some());
            prop_assert!(s.raw_token(&last, &counters).is_none());
        }
    }
}
