//! The data of one instance's `Store`: WASI and WASI HTTP contexts, the resource table, the
//! memory limiter, and the streams that carry guest output to the log.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::{InstanceSetup, MemoryLimiter};
use crate::logs::LogSink;

/// Everything a store holds for its instance. One instance, one store, one of these.
pub struct InstanceState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    /// Enforces and measures the instance's memory limit.
    pub limiter: MemoryLimiter,
    hooks: Outbound,
    /// The shared store and what this type may use of it.
    shared: super::shared::SharedCtx,
}

impl InstanceState {
    pub(super) fn new(
        setup: &InstanceSetup<'_>,
        stdio: Option<super::Attached>,
        max_fields_size: usize,
    ) -> Self {
        let mut wasi = WasiCtxBuilder::new();
        for (key, value) in setup.env {
            if !crate::app::PLATFORM_ENV.contains(&key.as_str()) {
                wasi.env(key, value);
            }
        }
        // The host's own environment is not passed through: only what foreman and Heroku give.
        wasi.env("PORT", setup.port.to_string())
            .env("WASMFORM_PROCESS", setup.process)
            .env("WASMFORM_INSTANCE", setup.instance)
            .env("PS", setup.instance)
            .env("DYNO", setup.instance)
            .arg(setup.program)
            .args(setup.args);
        if let Some((node, fence)) = setup.cluster {
            wasi.env("WASMFORM_NODE", node)
                .env("WASMFORM_FENCE", fence.to_string());
        }
        let policy = super::sockets::Policy {
            instance: setup.instance.to_string(),
            listen: setup.listen.clone(),
            rules: setup
                .allowed_outbound_hosts
                .iter()
                .filter_map(|entry| crate::units::SocketRule::parse(entry)?.ok())
                .collect(),
            denied: setup.shared.denied.clone(),
        };
        // TCP is on, and every address goes through the policy (wasmtime-wasi's default check
        // denies everything; `inherit_network` would allow everything).
        wasi.allow_tcp(true).allow_udp(policy.any_udp());
        let policy = std::sync::Arc::new(policy);
        wasi.socket_addr_check(move |addr, use_| {
            let policy = policy.clone();
            Box::pin(async move { policy.check(addr, use_).await })
        });
        match stdio {
            Some(stdio) => {
                wasi.stdin(stdio.stdin)
                    .stdout(stdio.stdout)
                    .stderr(stdio.stderr);
            }
            None => {
                wasi.stdout(GuestOutput(setup.stdout.clone()))
                    .stderr(GuestOutput(setup.stderr.clone()));
            }
        }
        Self {
            wasi: wasi.build(),
            http: {
                let mut http = WasiHttpCtx::new();
                http.set_field_size_limit(max_fields_size);
                http
            },
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(setup.memory.as_usize(), setup.memory_used.clone()),
            hooks: Outbound {
                allowed: setup.allowed_outbound_hosts.to_vec(),
            },
            shared: setup.shared.clone(),
        }
    }
}

impl InstanceState {
    /// The view the shared-state host functions work on.
    pub(super) fn shared_view(&mut self) -> super::shared::SharedView<'_> {
        super::shared::SharedView {
            ctx: &self.shared,
            table: &mut self.table,
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outgoing HTTP from guests is denied: no network access is granted by default.
/// Outgoing HTTP: denied unless the request's host is in the type's
/// `allowed_outbound_hosts` (as Spin does); allowed requests are sent by wasmtime-wasi-http's
/// client (HTTP and HTTPS with the webpki roots).
struct Outbound {
    /// `host`, `host:port`, `*.domain` or `*`.
    allowed: Vec<String>,
}

impl Outbound {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        self.allowed.iter().any(|entry| allowed(entry, &host, port))
    }
}

/// Whether allow-list `entry` covers `host:port`. An entry without a port covers every port.
pub(crate) fn allowed(entry: &str, host: &str, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    let (pattern, entry_port) = match entry.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || entry.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    };
    if entry_port.is_some_and(|p| p != port) {
        return false;
    }
    let pattern = pattern.to_ascii_lowercase();
    let pattern = pattern.trim_start_matches('[').trim_end_matches(']');
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match pattern.strip_prefix("*.") {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => host == pattern,
    }
}

/// wasi-http's forbidden header names, as one shared filter: the crate's default builds a new
/// `Arc` closure on every header check (4 per hello request, 10–15 for a browser's).
static FORBIDDEN_HEADERS: std::sync::LazyLock<wasmtime_wasi_http::ForbiddenHeaderFilter> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(is_forbidden));

fn is_forbidden(name: &http::HeaderName) -> bool {
    wasmtime_wasi_http::DEFAULT_FORBIDDEN_HEADERS.contains(name)
}

impl WasiHttpHooks for Outbound {
    fn is_forbidden_header(&mut self, name: &http::HeaderName) -> bool {
        is_forbidden(name)
    }

    fn forbidden_header_filter(&mut self) -> wasmtime_wasi_http::ForbiddenHeaderFilter {
        FORBIDDEN_HEADERS.clone()
    }

    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        if !self.allows(request.uri()) {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

struct GuestOutput(LogSink);

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(SinkStream(self.0.clone()))
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(SinkStream(self.0.clone()))
    }
}

/// Never blocks the guest: the sink drops lines when the log printer falls behind.
struct SinkStream(LogSink);

#[wasmtime_wasi::async_trait]
impl Pollable for SinkStream {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for SinkStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.0.write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for SinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn outbound_allow_list() {
        assert!(allowed("*", "example.com", 443));
        assert!(allowed("example.com", "example.com", 8080));
        assert!(allowed("Example.com:8080", "example.com", 8080));
        assert!(!allowed("example.com:8080", "example.com", 443));
        assert!(!allowed("example.com", "evil-example.com", 443));
        assert!(allowed("*.example.com", "api.example.com", 443));
        assert!(!allowed("*.example.com", "example.com", 443));
        assert!(allowed("127.0.0.1:3000", "127.0.0.1", 3000));
        assert!(allowed("[::1]:3000", "[::1]", 3000));
    }
}
