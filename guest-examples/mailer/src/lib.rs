//! `mailer`: a queue consumer for `newsletter`. Each message is one subscriber; "sending"
//! marks the subscriber (`seen:subscriber-N` in bucket `newsletter`), then sleeps `MAIL_MS`
//! milliseconds (default 5, simulated I/O), then counts `sent`, or `duplicates` when the
//! subscriber had been marked before (the message was handled again after its mail went out).
//!
//! `FAIL_EVERY=10` makes the handler fail on every 10th subscriber, to exercise retries and
//! the dead-letter queue; `FAIL_MODE` says how: `panic` (default, a trap), `err` (returns
//! `err("mailer: refusing subscriber-N")`) or `hang` (sleeps forever, past the type's
//! `request_timeout`). Every failing delivery first counts `failed` in the bucket.
//!
//! The type needs `consume = "mail"` and `buckets = ["newsletter"]` in wasmform.toml.

wit_bindgen::generate!({
    path: "../../wit",
    inline: "
        package local:mailer;
        world mailer {
            include wasmform:host/shared-state@0.1.0;
            export wasmform:host/consumer@0.1.0;
        }
    ",
    world: "local:mailer/mailer",
    generate_all,
});

use wasi::keyvalue::{atomics, store};

struct Mailer;

export!(Mailer);

impl exports::wasmform::host::consumer::Guest for Mailer {
    fn handle(_queue: String, body: Vec<u8>) -> Result<(), String> {
        let subscriber = String::from_utf8_lossy(&body).into_owned();
        let number: u64 = subscriber
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let bucket = store::open("newsletter").map_err(|e| format!("{e:?}"))?;
        if let Some(every) = env_number("FAIL_EVERY")
            && every > 0
            && number % every == 0
        {
            atomics::increment(&bucket, "failed", 1).map_err(|e| format!("{e:?}"))?;
            match std::env::var("FAIL_MODE").as_deref() {
                Ok("err") => return Err(format!("mailer: refusing {subscriber}")),
                Ok("hang") => loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
                _ => panic!("mailer: refusing {subscriber} (FAIL_EVERY={every})"),
            }
        }
        // The mail goes out here: from this point on, handling the message again sends it
        // twice. The marker comes first so that a handler cut short mid-send shows up as a
        // duplicate when the message is redone.
        let seen = atomics::increment(&bucket, &format!("seen:{subscriber}"), 1)
            .map_err(|e| format!("{e:?}"))?;
        let ms = env_number("MAIL_MS").unwrap_or(5);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if seen > 1 {
            atomics::increment(&bucket, "duplicates", 1).map_err(|e| format!("{e:?}"))?;
        } else {
            atomics::increment(&bucket, "sent", 1).map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}
