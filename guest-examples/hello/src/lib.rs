//! `hello`: the demo web process. Answers every request with a line naming the
//! instance and a per-instance request counter, which shows that wasmform keeps
//! an instance alive across requests.

use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Requests handled by this instance. Guest globals survive between calls
/// because the host reuses the instance; calls never overlap.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let n = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        let instance = std::env::var("WASMFORM_INSTANCE").unwrap_or_else(|_| "unknown".into());
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let body = format!("hello from {instance}, request {n}, path {path}\n");

        let headers = Fields::from_list(&[
            ("content-type".into(), b"text/plain; charset=utf-8".to_vec()),
            ("x-wasmform-instance".into(), instance.into_bytes()),
            ("x-request-count".into(), n.to_string().into_bytes()),
        ])
        .expect("valid headers");
        let response = OutgoingResponse::new(headers);
        response.set_status_code(200).expect("valid status");
        let out_body = response.body().expect("body taken once");
        ResponseOutparam::set(response_out, Ok(response));

        let stream = out_body.write().expect("stream taken once");
        // blocking_write_and_flush accepts at most 4096 bytes per call.
        for chunk in body.as_bytes().chunks(4096) {
            stream.blocking_write_and_flush(chunk).expect("write body");
        }
        // The stream is a child of the body: drop it before finishing the body.
        drop(stream);
        OutgoingBody::finish(out_body, None).expect("finish body");
    }
}
