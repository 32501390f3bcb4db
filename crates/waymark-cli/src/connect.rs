//! How the client commands (`publish`, `replay`, `projections`, `verify`,
//! `inspect`, `parked`, `dlq`) reach a Waymark server: its address, TLS
//! (a CA to trust, optionally a client certificate for mutual TLS) and a
//! bearer token sent with every call.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A server and the credentials to reach it with.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// `host:port`, or a URL (`https://` turns TLS on with the system's
    /// roots when no CA is given).
    pub addr: String,
    /// The bearer token (a static token or a JWT).
    pub token: Option<String>,
    /// TLS settings; `None` is plaintext unless `addr` is `https://`.
    pub tls: Option<ClientTls>,
}

/// TLS settings of a client.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates to trust (the system's roots when `None`).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM) for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name to verify the server's certificate against, when it is not
    /// the host of `addr`.
    pub domain: Option<String>,
}

impl Endpoint {
    /// Plaintext to `addr`, no token.
    pub fn plain(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            ..Self::default()
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection with the endpoint's credentials on every call.
pub type Connection = InterceptedService<Channel, Bearer>;

/// Connects to `endpoint`.
///
/// # Errors
/// A bad address, unreadable TLS files, a token that is not text, or a
/// server that cannot be reached (with the reason: a refused connection,
/// a failed handshake).
pub async fn connect(endpoint: &Endpoint) -> anyhow::Result<Connection> {
    let addr = &endpoint.addr;
    let https = addr.starts_with("https://");
    let tls = match (&endpoint.tls, https) {
        (Some(tls), _) => Some(tls.clone()),
        (None, true) => Some(ClientTls::default()),
        (None, false) => None,
    };
    let url = if addr.contains("://") {
        if tls.is_some() {
            addr.replacen("http://", "https://", 1)
        } else {
            addr.to_owned()
        }
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let mut channel =
        Channel::from_shared(url).map_err(|e| anyhow!("bad address {addr:?}: {e}"))?;
    if let Some(tls) = &tls {
        channel = channel
            .tls_config(client_tls(tls)?)
            .context("tls configuration")?;
    }
    let bearer = match &endpoint.token {
        None => None,
        Some(token) => Some(
            format!("Bearer {}", token.trim())
                .parse::<AsciiMetadataValue>()
                .map_err(|_| anyhow!("the token is not printable ASCII"))?,
        ),
    };
    let channel = channel.connect().await.map_err(|e| {
        // The transport error alone says "transport error"; its sources say
        // what failed (refused, handshake, certificate).
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        anyhow!("cannot connect to waymark at {addr}: {why} (is `waymark dev` or `waymark serve` running{}?)",
            if tls.is_some() { ", with TLS" } else { "" })
    })?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

fn client_tls(tls: &ClientTls) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    match &tls.ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        }
        None => config = config.with_native_roots(),
    }
    if let Some((cert, key)) = &tls.identity {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
        let key_pem =
            std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}
