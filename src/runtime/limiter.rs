//! Per-instance memory limit over the *sum* of an instance's linear memories.
//!
//! `StoreLimits` applies its limit to each memory separately; a component may have several, so
//! the limit users set (`--memory 256MiB`) is enforced here over all of them, and the current use
//! is kept for `ps`. Denials are recorded so a crash can be reported as "memory quota exceeded"
//! instead of the `unreachable` trap the guest's allocator turns it into.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::{ResourceLimiter, Result};

/// The most table elements one table may hold (function references; guests need a few
/// thousand at most).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Tracks and caps one instance's memory.
#[derive(Debug)]
pub struct MemoryLimiter {
    /// Cap on the sum of all linear memories, in bytes.
    limit: usize,
    /// Current sum of all linear memories, in bytes.
    used: usize,
    /// Growth granted by the last `memory_growing`, undone if the growth then fails.
    last_grant: usize,
    /// Set when a growth was refused because of the limit: the size asked for, in bytes.
    denied: Option<usize>,
    /// `used`, published for `ps` (the store itself is owned by whoever runs the instance).
    gauge: Arc<AtomicU64>,
}

impl MemoryLimiter {
    /// A limiter allowing `limit` bytes in total.
    pub fn new(limit: usize, gauge: Arc<AtomicU64>) -> Self {
        gauge.store(0, Ordering::Relaxed);
        Self {
            limit,
            used: 0,
            last_grant: 0,
            denied: None,
            gauge,
        }
    }

    fn publish(&self) {
        self.gauge.store(self.used as u64, Ordering::Relaxed);
    }

    /// Total size the guest asked for when it was refused, if it ever was.
    pub fn denied(&self) -> Option<usize> {
        self.denied
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> Result<bool> {
        let grow = desired.saturating_sub(current);
        let total = self.used.saturating_add(grow);
        if total > self.limit {
            self.denied = Some(total);
            self.last_grant = 0;
            return Ok(false);
        }
        self.used = total;
        self.last_grant = grow;
        self.publish();
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> Result<()> {
        self.used -= std::mem::take(&mut self.last_grant);
        self.publish();
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 65536;

    #[test]
    fn sums_memories_and_records_denials() {
        let gauge = Arc::new(AtomicU64::new(0));
        let mut l = MemoryLimiter::new(10 * PAGE, gauge.clone());
        assert!(l.memory_growing(0, 4 * PAGE, None).unwrap());
        assert!(
            l.memory_growing(0, 4 * PAGE, None).unwrap(),
            "second memory"
        );
        assert_eq!(gauge.load(Ordering::Relaxed), 8 * PAGE as u64);
        assert!(
            !l.memory_growing(4 * PAGE, 7 * PAGE, None).unwrap(),
            "sum over the limit"
        );
        assert_eq!(l.denied(), Some(11 * PAGE));
        assert_eq!(gauge.load(Ordering::Relaxed), 8 * PAGE as u64);
        assert!(l.memory_growing(4 * PAGE, 6 * PAGE, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("os said no"))
            .unwrap();
        assert_eq!(
            gauge.load(Ordering::Relaxed),
            8 * PAGE as u64,
            "failed growth is not counted"
        );
        assert_eq!(gauge.load(Ordering::Relaxed), 8 * PAGE as u64);
    }
}
