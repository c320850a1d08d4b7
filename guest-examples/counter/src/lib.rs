//! `counter`: every request increments one shared key and answers with the new value.
//!
//! - `GET /` (any path): `increment("hits")` in bucket `counter`, atomically, on the host.
//! - `GET /racy`: the same with `get`, `+1`, `set`: two instances interleave and updates are
//!   lost. It exists to show why the atomic interface matters (and that the test can fail).
//! - `GET /value`: the current value.
//!
//! The type must list the bucket: `buckets = ["counter"]` in wasmform.toml.

wit_bindgen::generate!({
    path: "../../wit",
    world: "wasmform:host/shared-state",
    generate_all,
});

use wasi::keyvalue::{atomics, store};
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Counter;

wasip2::http::proxy::export!(Counter);

impl wasip2::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let (status, body) = match answer(&path) {
            Ok(text) => (200, text),
            Err(e) => (500, format!("store error: {e:?}\n")),
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

fn answer(path: &str) -> Result<String, store::Error> {
    let bucket = store::open("counter")?;
    match path {
        "/racy" => {
            let current = bucket
                .get("hits")?
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            // Yield between the read and the write, as real handlers do (a query, a log line):
            // another instance's request runs in between.
            std::thread::sleep(std::time::Duration::from_millis(1));
            let next = current + 1;
            bucket.set("hits", next.to_string().as_bytes())?;
            Ok(format!("{next}\n"))
        }
        "/value" => Ok(format!(
            "{}\n",
            bucket
                .get("hits")?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "0".into())
        )),
        _ => Ok(format!("{}\n", atomics::increment(&bucket, "hits", 1)?)),
    }
}
