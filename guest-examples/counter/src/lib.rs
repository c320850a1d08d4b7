//! `counter`: every request increments one shared key and answers with the new value.
//!
//! - `GET /` (any path): `increment("hits")` in bucket `counter`, atomically, on the host.
//! - `GET /racy`: the same with `get`, `+1`, `set`: two instances interleave and updates are
//!   lost. It exists to show why the atomic interface matters (and that the test can fail).
//! - `GET /value`: the current value.
//!
//! Routes exercising the rest of the interfaces, on any key of the bucket (values are ASCII,
//! without `&`, `=` or `,`; `-` stands for "absent" where a value may be absent):
//!
//! - `GET /set?k=v`, `GET /get?key=k` (→ the value or `-`), `GET /incr?key=k&by=n` (→ the new
//!   value);
//! - `GET /cas?key=k&expected=v|-&new=w` → `swapped` or `unchanged`;
//! - `GET /set-many?k1=v1&k2=v2…`, `GET /get-many?keys=k1,k2` (→ `k1=v1 k2=-`),
//!   `GET /delete-many?keys=k1,k2`;
//! - `GET /keys` → `N keys, first F, last L, in P pages`, following `list-keys` cursors.
//!
//! The type must list the bucket: `buckets = ["counter"]` in wasmform.toml.

wit_bindgen::generate!({
    path: "../../wit",
    world: "wasmform:host/shared-state",
    generate_all,
});

use wasi::keyvalue::{atomics, batch, store};
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasmform::host::cas;

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
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let arg = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| *v)
    };
    let absent = |v: &str| (v != "-").then(|| v.as_bytes().to_vec());
    let shown = |v: Option<Vec<u8>>| {
        v.map_or("-".to_string(), |v| {
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    match route {
        "/set" => {
            for (k, v) in &pairs {
                bucket.set(k, v.as_bytes())?;
            }
            return Ok("ok\n".into());
        }
        "/get" => return Ok(format!("{}\n", shown(bucket.get(arg("key"))?))),
        "/incr" => {
            let by = arg("by").parse().unwrap_or(1);
            return Ok(format!(
                "{}\n",
                atomics::increment(&bucket, arg("key"), by)?
            ));
        }
        "/cas" => {
            let swapped = cas::compare_and_swap(
                &bucket,
                arg("key"),
                absent(arg("expected")).as_deref(),
                arg("new").as_bytes(),
            )?;
            return Ok(if swapped { "swapped\n" } else { "unchanged\n" }.into());
        }
        "/set-many" => {
            let pairs: Vec<(String, Vec<u8>)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect();
            batch::set_many(&bucket, &pairs)?;
            return Ok("ok\n".into());
        }
        "/get-many" => {
            let keys: Vec<String> = arg("keys").split(',').map(String::from).collect();
            let found = batch::get_many(&bucket, &keys)?;
            let words: Vec<String> = keys
                .iter()
                .zip(found)
                .map(|(k, v)| format!("{k}={}", shown(v.map(|(_, v)| v))))
                .collect();
            return Ok(format!("{}\n", words.join(" ")));
        }
        "/delete-many" => {
            let keys: Vec<String> = arg("keys").split(',').map(String::from).collect();
            batch::delete_many(&bucket, &keys)?;
            return Ok("ok\n".into());
        }
        "/keys" => {
            let (mut keys, mut cursor, mut pages) = (Vec::new(), None, 0);
            loop {
                let page = bucket.list_keys(cursor)?;
                pages += 1;
                keys.extend(page.keys);
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            return Ok(format!(
                "{} keys, first {}, last {}, in {pages} pages\n",
                keys.len(),
                keys.first().map_or("-", String::as_str),
                keys.last().map_or("-", String::as_str)
            ));
        }
        _ => {}
    }
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
