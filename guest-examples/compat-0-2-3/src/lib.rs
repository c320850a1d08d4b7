//! `compat-0-2-3`: a web guest built against WASI 0.2.3 (the `wasi` crate
//! `0.14.1+wasi-0.2.3`), proving that the host (WASI 0.2.12) still runs components
//! that import and export an older 0.2.x. Every request gets
//! `200 compat 0.2.3 from {instance}\n`.
//!
//! `no_std` (and `build.rs`) on purpose: Rust std and the linker's unused preview1
//! adapter carry newer WASI bindings, and the component linker would raise our
//! imports to their version.
#![no_std]

extern crate alloc;

use alloc::format;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Without std, a panic just traps; the host reports the trap.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator export. On wasip2 wit-bindgen leaves it to
/// wasi-libc, which a `no_std` guest does not link, so provide it here.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        return align as *mut u8; // a dangling, aligned pointer for zero bytes
    }
    // SAFETY: the caller (the host) passes a valid align and, for a
    // reallocation, a pointer it got from this function with old_len bytes.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable() // out of memory: trap
    }
    ptr
}

/// The WASI release this crate's bindings were generated for.
const WASI_VERSION: &str = "0.2.3";

struct Compat;

// Exports `wasi:http/incoming-handler@0.2.3`.
wasi::http::proxy::export!(Compat);

impl wasi::exports::http::incoming_handler::Guest for Compat {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        // `wasi:cli/environment@0.2.3` directly (there is no std::env here).
        let instance = wasi::cli::environment::get_environment()
            .into_iter()
            .find_map(|(k, v)| (k == "WASMFORM_INSTANCE").then_some(v))
            .unwrap_or_else(|| "unknown".into());
        let body = format!("compat {WASI_VERSION} from {instance}\n");

        let headers =
            Fields::from_list(&[("content-type".into(), b"text/plain; charset=utf-8".into())])
                .expect("valid headers");
        let response = OutgoingResponse::new(headers);
        response.set_status_code(200).expect("valid status");
        let out_body = response.body().expect("body taken once");
        ResponseOutparam::set(response_out, Ok(response));

        // The body is far below the 4096-byte limit of one blocking write.
        let stream = out_body.write().expect("stream taken once");
        stream
            .blocking_write_and_flush(body.as_bytes())
            .expect("write body");
        drop(stream); // a child of the body: drop it before finishing the body
        OutgoingBody::finish(out_body, None).expect("finish body");
    }
}
