//! Shared state for scaled-out process types: key-value buckets (`wasi:keyvalue`) and job
//! queues (`wasmform:host/queue`), behind one [`Store`] with two backends:
//!
//! - [`embedded`]: SQLite in the state directory (`.wasmform/shared.db`, WAL mode). Every
//!   operation is its own transaction, so an increment is atomic and an enqueued or
//!   acknowledged message survives `kill -9` of the host.
//! - [`redis`]: a Redis server (`[state] url = "redis://…"`), for hosts that share state.
//!
//! Both have the same semantics: values are bytes; `increment` works on values holding a
//! decimal number (absent = 0), as Redis's `INCRBY` does; a queue delivers each message to one
//! consumer at a time under a lease; `ack` removes it; `nack` makes it due again after a short
//! backoff, or moves it to the queue's dead letters once it has been delivered `max_attempts`
//! times; `release` puts it back at once without counting the delivery (its instance was
//! stopped before handling it, or while its handler ran past the timeout). Each delivery holds a lease token: `ack`, `nack` and `release` apply only while
//! the message is still leased under that token, so a late answer after a lapsed lease (the
//! message meanwhile went to another consumer) changes nothing. Messages are delivered in
//! due-time order (a retry is due after its backoff, not
//! behind the whole backlog). A message whose lease lapsed (its host died) is due again; one
//! already delivered `max_attempts` times without an answer is dead-lettered when it comes up,
//! so a message that crashes hosts cannot loop forever.
//!
//! Nothing here knows about wasmtime: [`crate::runtime`] maps guest calls onto a [`Store`].

pub mod embedded;
pub mod redis;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

/// Keys returned per `list-keys` page.
pub const PAGE: usize = 1000;

/// An error of the store, as text for the guest.
pub type StoreResult<T> = std::result::Result<T, String>;

/// A message delivered to a consumer.
#[derive(Clone, Debug)]
pub struct Job {
    /// Unique within the store.
    pub id: u64,
    /// Its queue.
    pub queue: String,
    /// What was enqueued.
    pub body: Vec<u8>,
    /// Deliveries so far, this one included.
    pub attempts: u32,
    /// The lease token of this delivery: answers for it apply only while the store still
    /// holds the message under it (a lapsed lease given to another consumer has another).
    pub lease: u64,
}

/// What `nack` did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nacked {
    /// Due again after a backoff.
    Retry,
    /// Delivered `max_attempts` times: moved to the dead letters.
    DeadLettered,
    /// The lease had lapsed and the message was delivered again (or handled): nothing changed.
    Lapsed,
}

/// Depths of one queue, for `ps` and the metrics.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Messages waiting or being handled.
    pub pending: u64,
    /// Messages given up on.
    pub dead: u64,
}

/// The shared store of an app.
#[derive(Clone)]
pub enum Store {
    /// SQLite in the state directory.
    Embedded(Arc<embedded::Embedded>),
    /// A Redis server.
    Redis(redis::RedisStore),
}

impl Store {
    /// Opens the store: Redis at `url` if given, else SQLite at `dir/shared.db` (in memory
    /// without a directory).
    pub async fn open(url: Option<&str>, dir: Option<&Path>) -> Result<Self> {
        match url {
            Some(url) => Ok(Self::Redis(redis::RedisStore::open(url).await?)),
            None => {
                let path = dir.map(|d| d.join("shared.db"));
                let runtime = tokio::runtime::Handle::current();
                let store = tokio::task::spawn_blocking(move || {
                    embedded::Embedded::open(path.as_deref(), runtime)
                })
                .await??;
                Ok(Self::Embedded(Arc::new(store)))
            }
        }
    }

    /// Since when and why the store cannot be reached (a Redis server that went away), or
    /// `None`. The embedded store is always there.
    pub async fn unreachable(&self) -> Option<(std::time::SystemTime, String)> {
        match self {
            Self::Embedded(_) => None,
            Self::Redis(r) => r.unreachable().await,
        }
    }

    /// The backend's name, for the start-up line.
    pub fn describe(&self) -> String {
        match self {
            Self::Embedded(e) => e.describe(),
            Self::Redis(r) => r.describe(),
        }
    }

    /// The value of `key`.
    pub async fn get(&self, bucket: &str, key: &str) -> StoreResult<Option<Vec<u8>>> {
        match self {
            Self::Embedded(e) => {
                let (b, k) = (bucket.to_string(), key.to_string());
                e.run(move |e| e.get(&b, &k)).await
            }
            Self::Redis(r) => r.get(bucket, key).await,
        }
    }

    /// Sets `key`.
    pub async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> StoreResult<()> {
        self.set_many(bucket, vec![(key.to_string(), value)]).await
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, bucket: &str, key: &str) -> StoreResult<()> {
        self.delete_many(bucket, vec![key.to_string()]).await
    }

    /// Whether `key` exists.
    pub async fn exists(&self, bucket: &str, key: &str) -> StoreResult<bool> {
        Ok(self.get(bucket, key).await?.is_some())
    }

    /// One page of keys in name order from `cursor`, and the cursor of the next page.
    pub async fn list_keys(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> StoreResult<(Vec<String>, Option<u64>)> {
        match self {
            Self::Embedded(e) => {
                let b = bucket.to_string();
                e.run(move |e| e.list_keys(&b, cursor)).await
            }
            Self::Redis(r) => r.list_keys(bucket, cursor).await,
        }
    }

    /// Adds `delta` to the number in `key` (absent = 0) atomically; returns the new value.
    pub async fn increment(&self, bucket: &str, key: &str, delta: u64) -> StoreResult<u64> {
        match self {
            Self::Embedded(e) => {
                let (b, k) = (bucket.to_string(), key.to_string());
                e.run(move |e| e.increment(&b, &k, delta)).await
            }
            Self::Redis(r) => r.increment(bucket, key, delta).await,
        }
    }

    /// Sets `key` to `new` if it holds `expected` (`None`: absent), atomically.
    pub async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> StoreResult<bool> {
        match self {
            Self::Embedded(e) => {
                let (b, k) = (bucket.to_string(), key.to_string());
                e.run(move |e| e.compare_and_swap(&b, &k, expected.as_deref(), &new))
                    .await
            }
            Self::Redis(r) => r.compare_and_swap(bucket, key, expected, new).await,
        }
    }

    /// The values of `keys`, `None` for absent ones.
    pub async fn get_many(
        &self,
        bucket: &str,
        keys: Vec<String>,
    ) -> StoreResult<Vec<Option<(String, Vec<u8>)>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(bucket, &key).await?.map(|v| (key, v)));
        }
        Ok(out)
    }

    /// Sets every pair in one transaction.
    pub async fn set_many(&self, bucket: &str, pairs: Vec<(String, Vec<u8>)>) -> StoreResult<()> {
        match self {
            Self::Embedded(e) => {
                let b = bucket.to_string();
                e.run(move |e| e.set_many(&b, &pairs)).await
            }
            Self::Redis(r) => r.set_many(bucket, pairs).await,
        }
    }

    /// Deletes every key in one transaction.
    pub async fn delete_many(&self, bucket: &str, keys: Vec<String>) -> StoreResult<()> {
        match self {
            Self::Embedded(e) => {
                let b = bucket.to_string();
                e.run(move |e| e.delete_many(&b, &keys)).await
            }
            Self::Redis(r) => r.delete_many(bucket, keys).await,
        }
    }

    /// Appends `bodies` to `queue` in one transaction.
    pub async fn enqueue(&self, queue: &str, bodies: Vec<Vec<u8>>) -> StoreResult<()> {
        match self {
            Self::Embedded(e) => {
                let q = queue.to_string();
                e.run(move |e| e.enqueue(&q, &bodies)).await
            }
            Self::Redis(r) => r.enqueue(queue, bodies).await,
        }
    }

    /// The oldest due message of `queue`, leased to the caller for `lease` (after which
    /// another consumer may get it: how a dead host's messages come back); `None` if there is
    /// none.
    /// A message already delivered `max_attempts` times without an answer (its handler
    /// crashed or hung the host) is dead-lettered instead.
    pub async fn reserve(
        &self,
        queue: &str,
        lease: Duration,
        max_attempts: u32,
    ) -> StoreResult<Option<Job>> {
        match self {
            Self::Embedded(e) => {
                let q = queue.to_string();
                e.run(move |e| e.reserve(&q, lease, max_attempts)).await
            }
            Self::Redis(r) => r.reserve(queue, lease, max_attempts).await,
        }
    }

    /// Waits (up to `timeout`) until a message may have arrived.
    pub async fn wait(&self, timeout: Duration) {
        match self {
            Self::Embedded(e) => {
                let _ = tokio::time::timeout(timeout, e.arrived.notified()).await;
            }
            // Polling: other hosts may enqueue too.
            Self::Redis(_) => tokio::time::sleep(timeout.min(Duration::from_millis(50))).await,
        }
    }

    /// Removes a handled message; `false` if its lease had lapsed and it was delivered again
    /// (nothing changed).
    pub async fn ack(&self, job: &Job) -> StoreResult<bool> {
        match self {
            Self::Embedded(e) => {
                let job = job.clone();
                e.run(move |e| e.ack(&job)).await
            }
            Self::Redis(r) => r.ack(job).await,
        }
    }

    /// A failed delivery: due again after a backoff, or dead-lettered after `max_attempts`.
    pub async fn nack(&self, job: &Job, reason: &str, max_attempts: u32) -> StoreResult<Nacked> {
        match self {
            Self::Embedded(e) => {
                let (job, reason) = (job.clone(), reason.to_string());
                e.run(move |e| e.nack(&job, &reason, max_attempts)).await
            }
            Self::Redis(r) => r.nack(job, reason, max_attempts).await,
        }
    }

    /// Puts a message back at once without counting the delivery (its instance stopped before
    /// the handler could finish);
    /// `false` if its lease had lapsed and it was delivered again (nothing changed).
    pub async fn release(&self, job: &Job) -> StoreResult<bool> {
        match self {
            Self::Embedded(e) => {
                let job = job.clone();
                e.run(move |e| e.release(&job)).await
            }
            Self::Redis(r) => r.release(job).await,
        }
    }

    /// Depth of `queue`.
    pub async fn stats(&self, queue: &str) -> StoreResult<QueueStats> {
        match self {
            Self::Embedded(e) => {
                let q = queue.to_string();
                e.run(move |e| e.stats(&q)).await
            }
            Self::Redis(r) => r.stats(queue).await,
        }
    }
}

/// Backoff before a failed message is due again: 100 ms, doubling, at most 10 s.
pub fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempts.saturating_sub(1).min(7)))
        .min(Duration::from_secs(10))
}

/// The largest counter value: both backends agree on it (Redis scripts count in doubles).
pub const MAX_COUNTER: u64 = (1 << 53) - 1;

/// Parses a counter value as `increment` does on both backends: ASCII digits, optionally
/// surrounded by ASCII whitespace, up to [`MAX_COUNTER`]. Leading zeros are not significant
/// (`000…0042` is 42, however many zeros), as in the Redis script.
pub fn parse_counter(key: &str, value: &[u8]) -> StoreResult<u64> {
    let text = value.trim_ascii();
    let number = (!text.is_empty() && text.iter().all(u8::is_ascii_digit))
        .then(|| std::str::from_utf8(text).ok()?.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n <= MAX_COUNTER);
    number.ok_or_else(|| {
        format!("cannot increment `{key}`: its value is not a decimal number up to 2^53-1")
    })
}

/// A `redis-server` of the test's own, for unit tests of the Redis scripts.
#[cfg(test)]
pub(crate) struct TestRedis {
    _server: crate::test_tools::Redis,
    /// `redis://127.0.0.1:PORT/?namespace=test`.
    pub(crate) url: String,
}

#[cfg(test)]
impl TestRedis {
    pub(crate) fn start() -> Self {
        let server = crate::test_tools::Redis::start();
        let url = format!("redis://127.0.0.1:{}/?namespace=test", server.port);
        Self {
            _server: server,
            url,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `scenario` on the embedded store and on a fresh Redis server.
    async fn on_both<F, Fut>(scenario: F)
    where
        F: Fn(Store, &'static str) -> Fut,
        Fut: Future<Output = ()>,
    {
        scenario(Store::open(None, None).await.unwrap(), "embedded").await;
        let redis = TestRedis::start();
        scenario(Store::open(Some(&redis.url), None).await.unwrap(), "redis").await;
    }

    fn depths(pending: u64, dead: u64) -> QueueStats {
        QueueStats {
            queue: "q".into(),
            pending,
            dead,
        }
    }

    /// Script calls the server has run since its stats were reset.
    async fn script_calls(conn: &mut ::redis::aio::MultiplexedConnection) -> u64 {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_eval:") || l.starts_with("cmdstat_evalsha:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn enqueue_many_is_one_script_on_redis() {
        let server = TestRedis::start();
        let store = Store::open(Some(&server.url), None).await.unwrap();
        let client = ::redis::Client::open(server.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // Loads the script, so that what follows is counted as plain calls.
        store.enqueue("q", vec![b"first".to_vec()]).await.unwrap();
        let () = ::redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .unwrap();
        let bodies: Vec<Vec<u8>> = (0..2500).map(|i| format!("m{i}").into_bytes()).collect();
        store.enqueue("q", bodies).await.unwrap();
        assert_eq!(script_calls(&mut conn).await, 1, "one transaction");
        assert_eq!(store.stats("q").await.unwrap(), depths(2501, 0));
        let mut seen = Vec::new();
        while let Some(job) = store
            .reserve("q", Duration::from_secs(60), 5)
            .await
            .unwrap()
        {
            seen.push(String::from_utf8(job.body).unwrap());
        }
        let expected: Vec<String> = std::iter::once("first".to_string())
            .chain((0..2500).map(|i| format!("m{i}")))
            .collect();
        assert_eq!(seen, expected, "in order, each once");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn counters_parse_the_same_on_both_backends() {
        on_both(|store, backend| async move {
            for (value, next) in [
                ("41", Ok(42)),
                (" 41\r\n", Ok(42)),
                ("0000000000000000000000041", Ok(42)),
                ("00000000000000000000", Ok(1)),
                ("9007199254740990", Ok(MAX_COUNTER)),
                ("0009007199254740990", Ok(MAX_COUNTER)),
                ("9007199254740991", Err("would pass")),
                ("9007199254740992", Err("not a decimal")),
                ("00000000000000009007199254740992", Err("not a decimal")),
                ("99999999999999999999", Err("not a decimal")),
                ("-1", Err("not a decimal")),
                ("4 2", Err("not a decimal")),
                ("", Err("not a decimal")),
            ] {
                store
                    .set("b", "k", value.as_bytes().to_vec())
                    .await
                    .unwrap();
                let got = store.increment("b", "k", 1).await;
                match next {
                    Ok(n) => assert_eq!(got, Ok(n), "{backend}: `{value}`"),
                    Err(why) => {
                        let e = got.unwrap_err();
                        assert!(e.starts_with("cannot increment `k`: "), "{backend}: {e}");
                        assert!(e.contains(why), "{backend}: `{value}`: {e}");
                    }
                }
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn apps_on_one_redis_server_have_their_own_namespace() {
        let server = TestRedis::start();
        let other = server
            .url
            .replace("namespace=test", "namespace=other.app-2");
        let (a, b) = (
            Store::open(Some(&server.url), None).await.unwrap(),
            Store::open(Some(&other), None).await.unwrap(),
        );
        a.set("b", "k", b"a".to_vec()).await.unwrap();
        a.enqueue("q", vec![b"m".to_vec()]).await.unwrap();
        assert_eq!(b.get("b", "k").await.unwrap(), None);
        assert_eq!(b.list_keys("b", None).await.unwrap(), (vec![], None));
        assert_eq!(b.stats("q").await.unwrap(), depths(0, 0));
        assert!(
            b.reserve("q", Duration::from_secs(60), 5)
                .await
                .unwrap()
                .is_none()
        );
        // The same namespace is the same app: hosts sharing a server share its state.
        let again = Store::open(Some(&server.url), None).await.unwrap();
        assert_eq!(again.get("b", "k").await.unwrap(), Some(b"a".to_vec()));

        let port = server
            .url
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let bare = format!("redis://127.0.0.1:{port}");
        let e = Store::open(Some(&bare), None).await.err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "state.url `{bare}` names no namespace: add `?namespace=NAME` (the app's own keys on the server, the same on every host that shares its state), e.g. `redis://127.0.0.1:6379/?namespace=myapp`"
            )
        );
        for bad in ["", "a:b", "a%20b"] {
            let url = format!("{bare}/?namespace={bad}");
            let e = Store::open(Some(&url), None).await.err().unwrap();
            assert_eq!(
                e.to_string(),
                format!("state.url `{url}`: namespace `{bad}` must be 1-128 of A-Z a-z 0-9 _ . -")
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_after_a_lapsed_lease_change_nothing() {
        on_both(|store, backend| async move {
            store.enqueue("q", vec![b"a".to_vec()]).await.unwrap();
            let first = store
                .reserve("q", Duration::ZERO, 5)
                .await
                .unwrap()
                .unwrap();
            // The lease lapsed at once: another consumer gets the message.
            let second = store
                .reserve("q", Duration::from_secs(60), 5)
                .await
                .unwrap()
                .unwrap();
            assert_eq!((second.id, second.attempts), (first.id, 2), "{backend}");
            assert_ne!(first.lease, second.lease, "{backend}");
            assert!(!store.ack(&first).await.unwrap(), "{backend}");
            assert_eq!(
                store.nack(&first, "late", 1).await.unwrap(),
                Nacked::Lapsed,
                "{backend}"
            );
            assert!(!store.release(&first).await.unwrap(), "{backend}");
            assert_eq!(store.stats("q").await.unwrap(), depths(1, 0), "{backend}");
            assert!(
                store
                    .reserve("q", Duration::from_secs(60), 5)
                    .await
                    .unwrap()
                    .is_none(),
                "{backend}: still leased to the second consumer"
            );
            assert!(store.ack(&second).await.unwrap(), "{backend}");
            assert_eq!(store.stats("q").await.unwrap(), depths(0, 0), "{backend}");
            // Once handled, every late answer is ignored too.
            assert_eq!(
                store.nack(&second, "late", 1).await.unwrap(),
                Nacked::Lapsed,
                "{backend}"
            );
            assert!(!store.release(&second).await.unwrap(), "{backend}");
            assert_eq!(store.stats("q").await.unwrap(), depths(0, 0), "{backend}");

            // A nack or release applies once, under the current lease only.
            store.enqueue("q", vec![b"b".to_vec()]).await.unwrap();
            let held = store
                .reserve("q", Duration::from_secs(60), 5)
                .await
                .unwrap()
                .unwrap();
            assert!(store.release(&held).await.unwrap(), "{backend}");
            assert!(!store.release(&held).await.unwrap(), "{backend}");
            let again = store
                .reserve("q", Duration::from_secs(60), 1)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(again.attempts, 1, "{backend}: a release does not count");
            assert!(!store.ack(&held).await.unwrap(), "{backend}");
            assert_eq!(
                store.nack(&again, "boom", 1).await.unwrap(),
                Nacked::DeadLettered,
                "{backend}"
            );
            assert_eq!(
                store.nack(&again, "boom", 1).await.unwrap(),
                Nacked::Lapsed,
                "{backend}"
            );
            assert_eq!(store.stats("q").await.unwrap(), depths(0, 1), "{backend}");
        })
        .await;
    }

    #[test]
    fn counters_are_ascii_decimal_up_to_2_pow_53() {
        assert_eq!(parse_counter("k", b"42"), Ok(42));
        assert_eq!(parse_counter("k", b" \t42\r\n"), Ok(42));
        assert_eq!(parse_counter("k", b"9007199254740991"), Ok(MAX_COUNTER));
        assert_eq!(parse_counter("k", b"0000000000000000000000042"), Ok(42));
        assert_eq!(
            parse_counter("k", b"000000009007199254740991"),
            Ok(MAX_COUNTER)
        );
        assert_eq!(parse_counter("k", b"00000000000000000000"), Ok(0));
        for bad in [
            &b""[..],
            b"  ",
            b"+1",
            b"-1",
            b"4 2",
            b"0x10",
            b"9007199254740992",
            b"0009007199254740992",
            "٤٢".as_bytes(),
        ] {
            let e = parse_counter("k", bad).unwrap_err();
            assert!(e.contains("cannot increment `k`"), "{e}");
        }
    }
}
