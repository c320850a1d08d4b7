//! `GET /v1/logs`: the recent history, and with `follow=true` every new line as it comes,
//! until the client goes away.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

use super::{Api, ApiBody, error};

impl Api {
    /// `GET /v1/logs?lines=N&ps=web&follow=true`: plain text, one line each.
    pub(super) fn logs(&self, query: &str) -> Response<ApiBody> {
        let mut lines = 100usize;
        let mut filter = None;
        let mut follow = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "lines" => match value.parse() {
                    Ok(n) => lines = n,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!("invalid `lines={value}`: expected a whole number"),
                        );
                    }
                },
                "ps" => filter = Some(value.to_string()),
                "follow" => match parse_follow(value) {
                    Ok(f) => follow = f,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                },
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{key}`"),
                    );
                }
            }
        }
        if let Some(filter) = &filter {
            let types: Vec<String> = self
                .supervisor
                .ps()
                .types
                .into_iter()
                .map(|t| t.name)
                .collect();
            let (kind, index) = filter.split_once('.').unwrap_or((filter, ""));
            // `run` and `run.N`: one-off processes (`wasmform run --detach`).
            let known = [crate::logs::HOST, crate::logs::API].contains(&filter.as_str())
                || ((kind == "run" || types.iter().any(|t| t == kind))
                    && (index.is_empty() || index.bytes().all(|b| b.is_ascii_digit())));
            if !known {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unknown process type or instance `{filter}`: known types are {} (an instance is `TYPE.N`; `{}` is the host)",
                        types.join(", "),
                        crate::logs::HOST
                    ),
                );
            }
        }
        // Subscribe before reading the history so no line falls between the two.
        let live = follow.then(|| self.logs.follow());
        let mut text = String::new();
        for record in self.logs.recent(lines, filter.as_deref()) {
            text.push_str(&record.plain());
            text.push('\n');
        }
        let body = match live {
            None => Full::new(Bytes::from(text)).boxed_unsync(),
            Some(live) => {
                let (tx, rx) = mpsc::channel(256);
                tokio::spawn(forward(text, live, filter, tx));
                ChannelBody(rx).boxed_unsync()
            }
        };
        let mut response = Response::new(body);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl Api {
    /// `GET /v1/events?since=SEQ&follow=false`: JSON Lines, one event each (see
    /// `docs/events.md`). Without `since`, only events from now on; `since=0` replays every
    /// kept event first. With `follow=false`, the kept events and no more.
    pub(super) fn events(&self, query: &str) -> Response<ApiBody> {
        let mut since = None;
        let mut follow = true;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "since" => match value.parse::<u64>() {
                    Ok(n) => since = Some(n),
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "invalid `since={value}`: expected an event's sequence number (`seq`), 0 for every kept event"
                            ),
                        );
                    }
                },
                "follow" => match parse_follow(value) {
                    Ok(f) => follow = f,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                },
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "unknown parameter `{key}`: `/v1/events` takes `since` and `follow`"
                        ),
                    );
                }
            }
        }
        let (history, live) = self.events.subscribe(since.or((!follow).then_some(0)));
        let mut text = String::new();
        for event in &history {
            text.push_str(&event.json);
            text.push('\n');
        }
        let body = if follow {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(forward_events(text, live, self.events.clone(), tx));
            ChannelBody(rx).boxed_unsync()
        } else {
            Full::new(Bytes::from(text)).boxed_unsync()
        };
        let mut response = Response::new(body);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/jsonl"),
        );
        response
    }
}

/// `follow=` of `/v1/logs` and `/v1/events`.
fn parse_follow(value: &str) -> Result<bool, String> {
    match value {
        "" | "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!(
            "invalid `follow={value}`: expected `true` or `false`"
        )),
    }
}

/// Streams the kept events, then every new one, until the client goes away.
async fn forward_events(
    history: String,
    mut live: broadcast::Receiver<Arc<crate::events::Event>>,
    events: crate::events::Events,
    tx: mpsc::Sender<Bytes>,
) {
    if !history.is_empty() && tx.send(Bytes::from(history)).await.is_err() {
        return;
    }
    loop {
        let line = match live.recv().await {
            Ok(event) => format!("{}\n", event.json),
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{}\n", events.skipped(n)),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Bytes::from(line)).await.is_err() {
            return;
        }
    }
}

/// Streams the history, then every new matching line, until the client goes away.
async fn forward(
    history: String,
    mut live: broadcast::Receiver<Arc<crate::logs::Record>>,
    filter: Option<String>,
    tx: mpsc::Sender<Bytes>,
) {
    if tx.send(Bytes::from(history)).await.is_err() {
        return;
    }
    loop {
        let line = match live.recv().await {
            Ok(record) if filter.as_deref().is_none_or(|f| record.matches(f)) => {
                format!("{}\n", record.plain())
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                format!("wasmform: {n} lines skipped: this follower fell behind\n")
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Bytes::from(line)).await.is_err() {
            return;
        }
    }
}

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
