//! The control API client shared by every client command (`scale`, `ps`, `logs`, `deploy`,
//! `run`…): finds the running host of an app by its control socket, or reaches a remote one
//! (`--remote`) over TCP with a bearer token, HTTPS off loopback; turns connection failures
//! into advice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::state::StateDir;

/// Which app a command talks to: the one in a directory (its control socket), or a host
/// elsewhere (`--remote`).
#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    /// The app's directory (the one holding its Procfile and `.wasmform/`), or its Procfile.
    /// Default: the current directory.
    #[arg(long = "app", value_name = "DIR")]
    app: Option<PathBuf>,

    /// The host's state directory, where `up --state-dir` put it (its control socket is
    /// there).
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// A host elsewhere: the URL of its control API (`up --control-tcp`), e.g.
    /// `https://edge-7.example.net:7070`; `http://` only to a loopback address.
    #[arg(long = "remote", env = "WASMFORM_REMOTE", value_name = "URL")]
    remote: Option<String>,

    /// File holding the remote host's bearer token (`up --control-token-file`).
    #[arg(
        long = "token-file",
        env = "WASMFORM_TOKEN_FILE",
        value_name = "FILE",
        requires = "remote"
    )]
    token_file: Option<PathBuf>,

    /// The remote host's certificate, or the CA that signed it (PEM): only a host that
    /// presents it (or one it signed, for the name in `--remote`) is trusted.
    #[arg(
        long = "remote-cert",
        env = "WASMFORM_REMOTE_CERT",
        value_name = "PEM",
        requires = "remote"
    )]
    remote_cert: Option<PathBuf>,
}

/// No host answers on the app's control socket: a client command then exits with
/// [`NO_HOST`](super::NO_HOST), so a script can tell it from a refused command.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoHost(String);

/// A connection to the control API.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection target: the app's control socket, or a remote host.
pub struct Client {
    dir: PathBuf,
    state: StateDir,
    remote: Option<Arc<Remote>>,
}

/// A host reached over TCP (`--remote`).
struct Remote {
    /// As given, for messages.
    url: String,
    /// `host:port`: where to connect, and the `Host` header.
    authority: String,
    token_file: PathBuf,
    /// HTTPS: the pinned certificate's client settings and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl Client {
    /// The client for the app named by `args`.
    pub fn new(args: &AppArgs) -> Result<Self> {
        let dir = match &args.app {
            Some(path) if path.is_file() => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Some(path) => path.clone(),
            None => std::env::current_dir().context("cannot read the current directory")?,
        };
        let state = match &args.state_dir {
            Some(state) => StateDir::new(state.clone()),
            None => StateDir::for_app(&dir),
        };
        let remote = match &args.remote {
            Some(url) => Some(Arc::new(Remote::new(
                url,
                args.token_file.as_deref(),
                args.remote_cert.as_deref(),
            )?)),
            None => None,
        };
        Ok(Self { dir, state, remote })
    }

    /// The client of the host whose state directory is `state` (`up --state-dir` may put it
    /// anywhere).
    pub fn for_state(state: &StateDir) -> Self {
        Self {
            dir: state.path().parent().unwrap_or(state.path()).to_path_buf(),
            state: state.clone(),
            remote: None,
        }
    }

    /// Whether a host answers on the app's control socket; a remote host is assumed to (a
    /// request to it then says why not).
    pub fn host_running(&self) -> bool {
        self.remote.is_some() || std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
    }

    /// Whether the host is remote (`--remote`): its files and processes are not this
    /// machine's.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The host, for messages: its directory, or its URL.
    pub fn describe(&self) -> String {
        match &self.remote {
            Some(remote) => remote.url.clone(),
            None => format!("`{}`", self.dir.display()),
        }
    }

    /// The app's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The app's state directory.
    pub fn state(&self) -> StateDir {
        self.state.clone()
    }

    fn socket(&self) -> PathBuf {
        self.state.socket()
    }

    /// A connection to the control API, for a request [`call`](Self::call) cannot make (an
    /// upgraded one); send it [`request`](Self::request)s.
    pub async fn connect(&self) -> Result<Box<dyn Stream>> {
        match &self.remote {
            None => Ok(Box::new(
                UnixStream::connect(self.socket())
                    .await
                    .map_err(|e| self.connect_error(e))?,
            )),
            Some(remote) => remote.connect().await,
        }
    }

    /// A request to the control API, with the `Host` (and, remotely, the bearer token) it
    /// needs.
    pub fn request(&self, method: Method, path: &str) -> Result<http::request::Builder> {
        let builder = Request::builder().method(method).uri(path);
        Ok(match &self.remote {
            None => builder.header(hyper::header::HOST, "wasmform"),
            Some(remote) => builder
                .header(hyper::header::HOST, &remote.authority)
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", remote.token()?),
                ),
        })
    }

    /// The message of a non-2xx answer: the API's `error`, else the body.
    pub async fn refusal(response: Response<Incoming>) -> String {
        let bytes = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return format!("the control API's answer was cut off: {e}"),
        };
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the API's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Response<Incoming>> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = self
            .request(method, path)?
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        self.send(request).await
    }

    /// Sends a prepared request; a non-2xx answer becomes an error carrying the API's
    /// message.
    pub async fn send<B>(&self, request: Request<B>) -> Result<Response<Incoming>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("control API handshake failed")?;
        tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .context("control API request failed")?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let message = Self::refusal(response).await;
        match status {
            StatusCode::UNAUTHORIZED => bail!(
                "the host at {} refused the token in `{}`: {message}",
                self.describe(),
                self.remote
                    .as_ref()
                    .map_or(PathBuf::new(), |r| r.token_file.clone())
                    .display()
            ),
            StatusCode::FORBIDDEN => bail!("permission denied by the control API: {message}"),
            StatusCode::NOT_FOUND => bail!(
                "the running host does not know this command ({message}): is it an older wasmform?"
            ),
            _ => bail!("{message}"),
        }
    }

    /// Sends a request and parses the JSON answer.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let response = self.call(method, path, body).await?;
        let bytes = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).context("the control API answered with invalid JSON")
    }

    fn connect_error(&self, e: std::io::Error) -> anyhow::Error {
        let socket = self.socket();
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                anyhow::Error::new(NoHost(format!(
                    "no wasmform host is running for `{}` (nothing answers on `{}`): start one with `wasmform up` there, or name the app with `--app DIR` (or a host elsewhere with `--remote URL`)",
                    self.dir.display(),
                    socket.display()
                )))
            }
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "permission denied on the control socket `{}`: it belongs to another user; run this as the user who started `wasmform up`",
                socket.display()
            ),
            _ => anyhow::anyhow!(
                "cannot reach the control socket `{}`: {e}",
                socket.display()
            ),
        }
    }
}

impl Remote {
    /// Checks `--remote URL` and its token and certificate files.
    fn new(url: &str, token_file: Option<&Path>, cert: Option<&Path>) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").with_context(|| {
            format!("--remote {url}: expected a URL such as `https://edge-7.example.net:7070`")
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!(
                "--remote {url}: give the control API's address only, e.g. `https://edge-7.example.net:7070`"
            );
        }
        let uri: http::uri::Authority = authority
            .parse()
            .with_context(|| format!("--remote {url}: `{authority}` is not a host and port"))?;
        if uri.port_u16().is_none() {
            bail!(
                "--remote {url}: name the port of the host's `--control-tcp`, e.g. `{scheme}://{authority}:7070`"
            );
        }
        let host = uri.host().trim_start_matches('[').trim_end_matches(']');
        let Some(token_file) = token_file else {
            bail!(
                "--remote {url}: a remote host needs its bearer token: `--token-file FILE` (or WASMFORM_TOKEN_FILE)"
            );
        };
        let tls = match scheme {
            "https" => {
                let Some(cert) = cert else {
                    bail!(
                        "--remote {url}: name the host's certificate, or the CA that signed it, with `--remote-cert FILE` (or WASMFORM_REMOTE_CERT)"
                    );
                };
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .with_context(|| format!("--remote {url}: `{host}` is not a server name"))?;
                Some((pinned(cert)?, name))
            }
            "http" => {
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    bail!(
                        "--remote {url}: plain http would send the token in clear text over the network: use https:// (the host's `--control-tls-cert`)"
                    );
                }
                None
            }
            other => bail!(
                "--remote {url}: unknown scheme `{other}`: use https:// (or http:// to a loopback address)"
            ),
        };
        Ok(Self {
            url: url.to_string(),
            authority: authority.to_string(),
            token_file: token_file.to_path_buf(),
            tls,
        })
    }

    /// The token, read now (it may have been rotated since the last command).
    fn token(&self) -> Result<String> {
        let token = std::fs::read_to_string(&self.token_file).with_context(|| {
            format!("cannot read the token file `{}`", self.token_file.display())
        })?;
        let token = token.trim();
        if token.is_empty() {
            bail!("the token file `{}` is empty", self.token_file.display());
        }
        Ok(token.to_string())
    }

    async fn connect(&self) -> Result<Box<dyn Stream>> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| {
                anyhow::Error::new(NoHost(format!(
                    "cannot reach the host at {}: {e}: is `wasmform up --control-tcp` running there?",
                    self.url
                )))
            })?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let stream = connector
            .connect(name.clone(), tcp)
            .await
            .with_context(|| {
                format!(
                    "TLS with the host at {} failed (is `--remote-cert` its certificate or its CA?)",
                    self.url
                )
            })?;
        Ok(Box::new(stream))
    }
}

/// Client TLS settings that trust only `file`'s certificates: a server presenting one of
/// them exactly, or one they signed for the name connected to.
fn pinned(file: &Path) -> Result<tokio_rustls::TlsConnector> {
    let certs = crate::control::read_certificates("--remote-cert", file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    // A certificate that cannot be a trust anchor can still be pinned exactly.
    let _ = roots.add_parsable_certificates(certs.iter().cloned());
    let signed = if roots.is_empty() {
        None
    } else {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .ok()
    };
    let verifier = Arc::new(Pinned {
        certs,
        signed,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup failed")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Trusts a server whose certificate is one of `certs` byte for byte, or is signed by one of
/// them for the name connected to (`signed`). Signatures of the handshake are checked as
/// always.
#[derive(Debug)]
struct Pinned {
    certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    signed: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match &self.signed {
            Some(signed) => signed.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The lines of a streamed answer (`/v1/events`, `/v1/logs?follow`), as they arrive.
pub struct Lines {
    body: Incoming,
    pending: Vec<u8>,
}

impl Lines {
    pub fn new(response: Response<Incoming>) -> Self {
        Self {
            body: response.into_body(),
            pending: Vec::new(),
        }
    }

    /// The next complete line, without its newline; `None` at the end of the stream, an error
    /// if it broke (the host went away mid-stream).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, hyper::Error>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return Some(Ok(line));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        self.pending.extend_from_slice(data);
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A current-thread runtime for a CLI client command.
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    Ok(runtime.block_on(future))
}

/// Formats bytes for tables: `256 MiB`.
pub fn size(bytes: u64) -> String {
    crate::app::ByteSize::bytes(bytes).to_string()
}

/// Prints the `PROCESS COUNT MEM` table and notes of a scale or restart answer.
pub fn print_formation(answer: &serde_json::Value) {
    let rows: Vec<(String, String, String)> = answer["formation"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("?").to_string(),
                t["desired"].to_string(),
                size(t["memory"].as_u64().unwrap_or(0)),
            )
        })
        .collect();
    let w = rows
        .iter()
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        .max("PROCESS".len());
    println!("{:<w$}  {:>5}  MEM", "PROCESS", "COUNT");
    for (name, count, memory) in rows {
        println!("{name:<w$}  {count:>5}  {memory}");
    }
    for note in answer["notes"].as_array().into_iter().flatten() {
        println!("note: {}", note.as_str().unwrap_or_default());
    }
}
