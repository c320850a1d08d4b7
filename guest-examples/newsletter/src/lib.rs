//! `newsletter`: the web side of a fan-out. `POST /send?n=20000` enqueues n jobs on queue
//! `mail` in one call; `mailer` consumers "send" each one. `GET /sent` answers how many were
//! sent, how many were sent twice, and how many deliveries failed (read from bucket
//! `newsletter`, which `mailer` writes): `sent S duplicates D failed F`.
//!
//! The type needs `queues = ["mail"]` and `buckets = ["newsletter"]` in wasmform.toml.

wit_bindgen::generate!({
    path: "../../wit",
    world: "wasmform:host/shared-state",
    generate_all,
});

use wasi::keyvalue::store;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasmform::host::queue;

struct Newsletter;

wasip2::http::proxy::export!(Newsletter);

impl wasip2::exports::http::incoming_handler::Guest for Newsletter {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let (path, query) = path.split_once('?').unwrap_or((&path, ""));
        let (status, body) = match (request.method(), path) {
            (Method::Post, "/send") => send(query),
            (Method::Get, "/sent") => sent(),
            _ => (404, "POST /send?n=N or GET /sent\n".to_string()),
        };
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(status).expect("valid status");
        let out = response.body().expect("body taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let stream = out.write().expect("stream taken once");
        stream
            .blocking_write_and_flush(body.as_bytes())
            .expect("write body");
        drop(stream);
        OutgoingBody::finish(out, None).expect("finish body");
    }
}

fn send(query: &str) -> (u16, String) {
    let Some(n) = query
        .split('&')
        .find_map(|p| p.strip_prefix("n="))
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return (
            400,
            "give the number of subscribers: /send?n=20000\n".into(),
        );
    };
    let jobs: Vec<Vec<u8>> = (1..=n)
        .map(|i| format!("subscriber-{i}").into_bytes())
        .collect();
    match queue::enqueue_many("mail", &jobs) {
        Ok(()) => (202, format!("queued {n}\n")),
        Err(e) => (500, format!("enqueue failed: {e:?}\n")),
    }
}

fn sent() -> (u16, String) {
    let read = || -> Result<(u64, u64, u64), store::Error> {
        let bucket = store::open("newsletter")?;
        let number = |key: &str| -> Result<u64, store::Error> {
            Ok(bucket
                .get(key)?
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0))
        };
        Ok((number("sent")?, number("duplicates")?, number("failed")?))
    };
    match read() {
        Ok((sent, duplicates, failed)) => (
            200,
            format!("sent {sent} duplicates {duplicates} failed {failed}\n"),
        ),
        Err(e) => (500, format!("store error: {e:?}\n")),
    }
}
