//! The embedded backend: one SQLite database in WAL mode. Every call is one transaction on
//! one connection behind a mutex, so operations are atomic and serialized. Calls run on the
//! host runtime's blocking threads (normal priority): a big `enqueue-many` or a WAL checkpoint
//! never stalls an async worker, and a background process (whose threads run at idle
//! priority) never holds the connection while being starved of CPU. WAL with `synchronous = NORMAL` keeps every committed transaction across a
//! crash of the host process (`kill -9`); only a power loss may drop the last ones.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::Notify;

use super::{Job, Nacked, PAGE, QueueStats, StoreResult, parse_counter, retry_delay};

/// The SQLite store.
pub struct Embedded {
    conn: Mutex<Connection>,
    /// The host runtime, whose blocking pool runs the calls.
    runtime: tokio::runtime::Handle,
    /// Where it lives, for messages.
    path: Option<std::path::PathBuf>,
    /// Woken on every local enqueue, so idle consumers do not poll.
    pub(crate) arrived: Notify,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn err(e: rusqlite::Error) -> String {
    format!("shared store: {e}")
}

impl Embedded {
    /// Opens (creating) the database at `path`, or an in-memory one; calls will run on
    /// `runtime`'s blocking threads. Leases left by a host that died are cleared (their
    /// messages are due at once): this host owns the state directory alone.
    pub fn open(path: Option<&Path>, runtime: tokio::runtime::Handle) -> Result<Self> {
        let conn = match path {
            Some(path) => Connection::open(path)
                .with_context(|| format!("failed to open the shared store `{}`", path.display()))?,
            None => Connection::open_in_memory().context("failed to open an in-memory store")?,
        };
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS kv (
                 bucket TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                 PRIMARY KEY (bucket, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, body BLOB NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0, due INTEGER NOT NULL,
                 leased INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS leases (
                 one INTEGER PRIMARY KEY CHECK (one = 1), last INTEGER NOT NULL);
             INSERT OR IGNORE INTO leases (one, last) VALUES (1, 0);
             CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, due, id);
             CREATE TABLE IF NOT EXISTS dead (
                 id INTEGER PRIMARY KEY, queue TEXT NOT NULL, body BLOB NOT NULL,
                 attempts INTEGER NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
             UPDATE jobs SET leased = 0, due = 0 WHERE leased != 0;",
        )
        .with_context(|| match path {
            Some(path) => format!(
                "the shared store `{}` is not usable: is it a SQLite database?",
                path.display()
            ),
            None => "failed to set up the in-memory store".to_string(),
        })?;
        Ok(Self {
            conn: Mutex::new(conn),
            runtime,
            path: path.map(Path::to_path_buf),
            arrived: Notify::new(),
        })
    }

    /// `embedded (path)`.
    pub fn describe(&self) -> String {
        match &self.path {
            Some(path) => format!("embedded ({})", path.display()),
            None => "embedded (in memory)".to_string(),
        }
    }

    /// Runs `f` with the store on a blocking thread of the host runtime.
    pub(crate) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let this = self.clone();
        self.runtime
            .spawn_blocking(move || f(&this))
            .await
            .map_err(|e| format!("shared store: {e}"))?
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, bucket: &str, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.conn()
            .query_row(
                "SELECT value FROM kv WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)
    }

    pub(crate) fn list_keys(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> StoreResult<(Vec<String>, Option<u64>)> {
        let offset = cursor.unwrap_or(0);
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT key FROM kv WHERE bucket = ?1 ORDER BY key LIMIT ?2 OFFSET ?3")
            .map_err(err)?;
        let keys: Vec<String> = stmt
            .query_map(
                params![
                    bucket,
                    PAGE as i64 + 1,
                    i64::try_from(offset).unwrap_or(i64::MAX)
                ],
                |row| row.get(0),
            )
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        Ok(page(keys, offset))
    }

    pub(crate) fn increment(&self, bucket: &str, key: &str, delta: u64) -> StoreResult<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        let current: Option<Vec<u8>> = tx
            .query_row(
                "SELECT value FROM kv WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)?;
        let current = match current {
            Some(value) => parse_counter(key, &value)?,
            None => 0,
        };
        let next = current
            .checked_add(delta)
            .filter(|n| *n <= super::MAX_COUNTER)
            .ok_or_else(|| format!("cannot increment `{key}`: the value would pass 2^53-1"))?;
        tx.execute(
            "INSERT INTO kv (bucket, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value",
            params![bucket, key, next.to_string().into_bytes()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(next)
    }

    pub(crate) fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        let current: Option<Vec<u8>> = tx
            .query_row(
                "SELECT value FROM kv WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)?;
        if current.as_deref() != expected {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO kv (bucket, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value",
            params![bucket, key, new],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(true)
    }

    pub(crate) fn set_many(&self, bucket: &str, pairs: &[(String, Vec<u8>)]) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO kv (bucket, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value",
                )
                .map_err(err)?;
            for (key, value) in pairs {
                stmt.execute(params![bucket, key, value]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    pub(crate) fn delete_many(&self, bucket: &str, keys: &[String]) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM kv WHERE bucket = ?1 AND key = ?2")
                .map_err(err)?;
            for key in keys {
                stmt.execute(params![bucket, key]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    pub(crate) fn enqueue(&self, queue: &str, bodies: &[Vec<u8>]) -> StoreResult<()> {
        {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(err)?;
            {
                let mut stmt = tx
                    .prepare_cached("INSERT INTO jobs (queue, body, due) VALUES (?1, ?2, ?3)")
                    .map_err(err)?;
                let now = now_ms();
                for body in bodies {
                    stmt.execute(params![queue, body, now]).map_err(err)?;
                }
            }
            tx.commit().map_err(err)?;
        }
        self.arrived.notify_waiters();
        Ok(())
    }

    pub(crate) fn reserve(
        &self,
        queue: &str,
        lease: Duration,
        max_attempts: u32,
    ) -> StoreResult<Option<Job>> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        let job = loop {
            let next = tx
                .query_row(
                    "SELECT id, body, attempts FROM jobs
                     WHERE queue = ?1 AND due <= ?2 ORDER BY due, id LIMIT 1",
                    params![queue, now],
                    |row| {
                        Ok(Job {
                            id: row.get::<_, i64>(0)? as u64,
                            queue: queue.to_string(),
                            body: row.get(1)?,
                            attempts: row.get::<_, u32>(2)? + 1,
                            lease: 0,
                        })
                    },
                )
                .optional()
                .map_err(err)?;
            let Some(job) = next else { break None };
            if job.attempts > max_attempts {
                // Delivered `max_attempts` times and never answered (the host died or
                // stopped while handling it): a poison message must not loop forever.
                dead_letter(&tx, job.id, POISON, now)?;
                continue;
            }
            // `leased` holds the lease token (0: not leased), from a sequence kept in the
            // database so that tokens are never reused, restarts included.
            let token: i64 = tx
                .query_row(
                    "UPDATE leases SET last = last + 1 WHERE one = 1 RETURNING last",
                    [],
                    |row| row.get(0),
                )
                .map_err(err)?;
            tx.execute(
                "UPDATE jobs SET attempts = ?2, due = ?3, leased = ?4 WHERE id = ?1",
                params![
                    job.id as i64,
                    job.attempts,
                    now + lease.as_millis() as i64,
                    token
                ],
            )
            .map_err(err)?;
            break Some(Job {
                lease: token as u64,
                ..job
            });
        };
        tx.commit().map_err(err)?;
        Ok(job)
    }

    pub(crate) fn ack(&self, job: &Job) -> StoreResult<bool> {
        self.conn()
            .execute(
                "DELETE FROM jobs WHERE id = ?1 AND leased = ?2",
                params![job.id as i64, job.lease as i64],
            )
            .map(|n| n == 1)
            .map_err(err)
    }

    pub(crate) fn nack(&self, job: &Job, reason: &str, max_attempts: u32) -> StoreResult<Nacked> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        let holds: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM jobs WHERE id = ?1 AND leased = ?2",
                params![job.id as i64, job.lease as i64],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)?;
        let outcome = if holds.is_none() {
            Nacked::Lapsed
        } else if job.attempts >= max_attempts {
            dead_letter(&tx, job.id, reason, now_ms())?;
            Nacked::DeadLettered
        } else {
            let due = now_ms() + retry_delay(job.attempts).as_millis() as i64;
            tx.execute(
                "UPDATE jobs SET due = ?2, leased = 0 WHERE id = ?1",
                params![job.id as i64, due],
            )
            .map_err(err)?;
            Nacked::Retry
        };
        tx.commit().map_err(err)?;
        if outcome == Nacked::Retry {
            self.arrived.notify_waiters();
        }
        Ok(outcome)
    }

    pub(crate) fn release(&self, job: &Job) -> StoreResult<bool> {
        let released = self
            .conn()
            .execute(
                "UPDATE jobs SET due = ?3, leased = 0, attempts = MAX(attempts - 1, 0)
                 WHERE id = ?1 AND leased = ?2",
                params![job.id as i64, job.lease as i64, now_ms()],
            )
            .map_err(err)?
            == 1;
        self.arrived.notify_waiters();
        Ok(released)
    }

    pub(crate) fn stats(&self, queue: &str) -> StoreResult<QueueStats> {
        let conn = self.conn();
        let count = |sql: &str| -> StoreResult<u64> {
            conn.query_row(sql, params![queue], |row| row.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(err)
        };
        Ok(QueueStats {
            queue: queue.to_string(),
            pending: count("SELECT COUNT(*) FROM jobs WHERE queue = ?1")?,
            dead: count("SELECT COUNT(*) FROM dead WHERE queue = ?1")?,
        })
    }
}

/// Why a message that was never answered was given up on.
pub(crate) const POISON: &str =
    "delivered max_attempts times without an answer (the host stopped or died while handling it)";

/// Moves message `id` to the dead letters.
fn dead_letter(tx: &rusqlite::Transaction<'_>, id: u64, reason: &str, now: i64) -> StoreResult<()> {
    tx.execute(
        "INSERT OR REPLACE INTO dead (id, queue, body, attempts, reason, at)
         SELECT id, queue, body, attempts, ?2, ?3 FROM jobs WHERE id = ?1",
        params![id as i64, reason, now],
    )
    .map_err(err)?;
    tx.execute("DELETE FROM jobs WHERE id = ?1", params![id as i64])
        .map_err(err)?;
    Ok(())
}

/// Cuts a page of at most [`PAGE`] keys (the query asked for one more, to know whether
/// another page follows).
pub(crate) fn page(mut keys: Vec<String>, offset: u64) -> (Vec<String>, Option<u64>) {
    if keys.len() > PAGE {
        keys.truncate(PAGE);
        (keys, Some(offset + PAGE as u64))
    } else {
        (keys, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_counters_cas_and_queues() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = Embedded::open(None, runtime.handle().clone()).unwrap();
        assert_eq!(store.increment("b", "n", 2).unwrap(), 2);
        assert_eq!(store.increment("b", "n", 3).unwrap(), 5);
        assert_eq!(store.get("b", "n").unwrap().unwrap(), b"5");
        store
            .set_many("b", &[("s".into(), b"text".to_vec())])
            .unwrap();
        assert!(
            store
                .increment("b", "s", 1)
                .unwrap_err()
                .contains("not a decimal")
        );
        assert!(store.compare_and_swap("b", "c", None, b"1").unwrap());
        assert!(!store.compare_and_swap("b", "c", None, b"2").unwrap());
        assert!(store.compare_and_swap("b", "c", Some(b"1"), b"2").unwrap());
        assert_eq!(
            store.list_keys("b", None).unwrap(),
            (vec!["c".into(), "n".into(), "s".into()], None)
        );
        assert_eq!(store.get("other", "n").unwrap(), None);

        store.enqueue("q", &[b"a".to_vec(), b"b".to_vec()]).unwrap();
        let a = store
            .reserve("q", Duration::from_secs(60), 5)
            .unwrap()
            .unwrap();
        let b = store
            .reserve("q", Duration::from_secs(60), 5)
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.body.as_slice(), b.body.as_slice()),
            (&b"a"[..], &b"b"[..])
        );
        assert!(
            store
                .reserve("q", Duration::from_secs(60), 5)
                .unwrap()
                .is_none(),
            "both are leased"
        );
        assert!(store.ack(&a).unwrap());
        assert_eq!(store.nack(&b, "boom", 2).unwrap(), Nacked::Retry);
        assert!(
            store
                .reserve("q", Duration::from_secs(60), 5)
                .unwrap()
                .is_none(),
            "backing off"
        );
        std::thread::sleep(retry_delay(1));
        let again = store
            .reserve("q", Duration::from_secs(60), 5)
            .unwrap()
            .unwrap();
        assert_eq!(again.attempts, 2);
        assert_eq!(store.nack(&again, "boom", 2).unwrap(), Nacked::DeadLettered);
        assert_eq!(
            store.stats("q").unwrap(),
            QueueStats {
                queue: "q".into(),
                pending: 0,
                dead: 1
            }
        );
    }

    #[test]
    fn lease_tokens_fence_late_answers_across_restarts() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let store = Embedded::open(Some(&path), runtime.handle().clone()).unwrap();
        store.enqueue("q", &[b"a".to_vec()]).unwrap();
        let before = store
            .reserve("q", Duration::from_secs(60), 5)
            .unwrap()
            .unwrap();
        drop(store);
        // The host died holding the lease: the next one clears it and hands out a new token.
        let store = Embedded::open(Some(&path), runtime.handle().clone()).unwrap();
        let after = store
            .reserve("q", Duration::from_secs(60), 5)
            .unwrap()
            .unwrap();
        assert_eq!((after.id, after.attempts), (before.id, 2));
        assert!(after.lease > before.lease, "tokens are never reused");
        assert!(!store.ack(&before).unwrap());
        assert_eq!(store.nack(&before, "late", 1).unwrap(), Nacked::Lapsed);
        assert!(!store.release(&before).unwrap());
        assert_eq!(store.stats("q").unwrap().pending, 1);
        assert!(store.ack(&after).unwrap());
        assert_eq!(store.stats("q").unwrap().pending, 0);
    }

    #[test]
    fn list_keys_pages() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = Embedded::open(None, runtime.handle().clone()).unwrap();
        let pairs: Vec<(String, Vec<u8>)> = (0..PAGE + 5)
            .map(|i| (format!("k{i:05}"), vec![]))
            .collect();
        store.set_many("b", &pairs).unwrap();
        let (first, next) = store.list_keys("b", None).unwrap();
        assert_eq!(first.len(), PAGE);
        let (rest, end) = store.list_keys("b", next).unwrap();
        assert_eq!(rest.len(), 5);
        assert_eq!(end, None);
    }
}
