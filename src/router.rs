//! Picks the instance for each request: round-robin over the instances that are up and free,
//! with a bounded wait queue when all are busy.
//!
//! Free instances sit in a FIFO ring of at most `rotate` instances (default [`HOT`]): a request takes the one that
//! has been free longest, and an instance goes to the back when it finishes. Up to `rotate`
//! instances, sequential traffic is exact round-robin. Free instances beyond that wait on a
//! stack of spares and are used (most recently used first) only when the ring is empty. So with
//! a thousand instances and 64 concurrent requests, traffic rotates over the ~100 instances
//! whose memory is warm in the CPU caches instead of walking all thousand; the trade-off is
//! that past `rotate` free instances the rotation is not over all of them (`--rotate 0`
//! rotates over every instance). When every instance is busy the request waits in a bounded queue and is handed
//! the next instance that frees up; when the queue is full, or no instance is up at all, the
//! request is refused at once (503), never left hanging. No wasmtime types here.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// What the pool needs to know of its instances.
pub trait Member {
    /// A retired instance (its slot stopped) is dropped on release instead of reused.
    fn is_retired(&self) -> bool;
}

/// Why no instance could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// No instance of the type is up (scaled to 0, all crashed, or shutting down).
    NoneUp,
    /// Every instance is busy and the wait queue is full.
    QueueFull,
}

/// How many free instances rotate round-robin by default; more wait as spares.
pub const HOT: usize = 32;

/// The instances of one HTTP process type.
pub struct Pool<T> {
    inner: Mutex<Inner<T>>,
    /// How many requests may wait for a free instance.
    queue_limit: usize,
    /// How many free instances rotate round-robin; the rest wait as spares.
    rotate: usize,
}

struct Inner<T> {
    /// Instances up and free, longest-free first; at most [`HOT`].
    idle: VecDeque<T>,
    /// Free instances beyond the ring, most recently freed last.
    spare: Vec<T>,
    /// Requests waiting for an instance, oldest first.
    waiters: VecDeque<oneshot::Sender<T>>,
    /// Instances that are up (free or busy) or being started to take a place in the pool.
    /// While it is above 0 a request may wait; when it drops to 0 the waiters are refused.
    live: usize,
}

impl<T: Member> Pool<T> {
    /// An empty pool letting `queue_limit` requests wait, rotating over [`HOT`] instances.
    #[cfg(test)]
    pub fn new(queue_limit: usize) -> Self {
        Self::with_rotation(queue_limit, HOT)
    }

    /// An empty pool rotating over at most `rotate` free instances (0: all of them).
    pub fn with_rotation(queue_limit: usize, rotate: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                idle: VecDeque::new(),
                spare: Vec::new(),
                waiters: VecDeque::new(),
                live: 0,
            }),
            queue_limit,
            rotate: if rotate == 0 { usize::MAX } else { rotate },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a free instance, waiting in the queue if all are busy.
    pub async fn acquire(&self) -> Result<T, Busy> {
        // Free instances retired since they were released (their slot stopped, e.g. by a
        // deploy that just replaced them) are never handed out; they are dropped, after the
        // lock, which ends their slot's wait.
        let mut retired = Vec::new();
        let rx = {
            let mut inner = self.lock();
            while let Some(instance) = inner.idle.pop_front().or_else(|| inner.spare.pop()) {
                if instance.is_retired() {
                    retired.push(instance);
                    continue;
                }
                drop(inner);
                drop(retired);
                return Ok(instance);
            }
            if inner.live == 0 {
                return Err(Busy::NoneUp);
            }
            // Forget waiters whose requests have gone away before judging the queue full.
            inner.waiters.retain(|w| !w.is_closed());
            if inner.waiters.len() >= self.queue_limit {
                return Err(Busy::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.push_back(tx);
            rx
        };
        drop(retired);
        rx.await.map_err(|_| Busy::NoneUp)
    }

    /// Announces an instance that is being started: requests may wait for it instead of being
    /// refused. Followed by [`Pool::release`] with the instance, or [`Pool::gone`] if it
    /// failed to start.
    pub fn reserve(&self) {
        self.lock().live += 1;
    }

    /// Returns an instance after a request: to the oldest waiter, else to the back of the
    /// free list.
    pub fn release(&self, mut instance: T) {
        if instance.is_retired() {
            return;
        }
        let mut inner = self.lock();
        while let Some(waiter) = inner.waiters.pop_front() {
            match waiter.send(instance) {
                Ok(()) => return,
                Err(back) => instance = back,
            }
        }
        if inner.idle.len() < self.rotate {
            inner.idle.push_back(instance);
        } else {
            inner.spare.push(instance);
        }
    }

    /// Requests waiting for an instance.
    pub fn waiting(&self) -> usize {
        self.lock()
            .waiters
            .iter()
            .filter(|w| !w.is_closed())
            .count()
    }

    /// Records that a reserved instance is gone for good: it failed to start, or crashed and
    /// will not be replaced right away.
    pub fn gone(&self) {
        let mut inner = self.lock();
        inner.live = inner.live.saturating_sub(1);
        if inner.live == 0 {
            // Nothing will free up: refuse the waiters now instead of letting them hang.
            inner.waiters.clear();
        }
    }

    /// Removes every free instance matching `pred` and returns them. Their slots still
    /// count as live until they call [`Pool::gone`].
    pub fn take_idle(&self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut inner = self.lock();
        let rotate = self.rotate;
        let inner = &mut *inner;
        let free = inner.idle.drain(..).chain(inner.spare.drain(..));
        let (taken, kept): (Vec<T>, Vec<T>) = free.partition(|t| pred(t));
        for instance in kept {
            if inner.idle.len() < rotate {
                inner.idle.push_back(instance);
            } else {
                inner.spare.push(instance);
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Member for u32 {
        /// Odd numbers above 100 play retired instances.
        fn is_retired(&self) -> bool {
            *self > 100 && self % 2 == 1
        }
    }

    #[tokio::test]
    async fn retired_instances_are_not_reused() {
        let pool = Pool::new(4);
        pool.reserve();
        pool.release(101);
        pool.reserve();
        pool.release(2);
        assert_eq!(pool.acquire().await, Ok(2));
    }

    /// An instance whose slot may retire it while it sits free in the pool.
    #[derive(Debug)]
    struct Retirable(u32, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Member for Retirable {
        fn is_retired(&self) -> bool {
            self.1.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn instances_retired_while_free_are_not_handed_out() {
        let pool = Pool::new(4);
        let old = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        pool.reserve();
        pool.release(Retirable(1, old.clone()));
        pool.reserve();
        pool.release(Retirable(2, Default::default()));
        // A deploy replaced instance 1: its slot retires it while it is free.
        old.store(true, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..3 {
            let got = pool.acquire().await.unwrap();
            assert_eq!(got.0, 2);
            pool.release(got);
        }
    }

    #[tokio::test]
    async fn round_robin_for_sequential_requests() {
        let pool = Pool::new(4);
        for i in 1..=3 {
            pool.reserve();
            pool.release(i);
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let i = pool.acquire().await.unwrap();
            order.push(i);
            pool.release(i);
        }
        assert_eq!(order, [1, 2, 3, 1, 2, 3]);
    }

    #[tokio::test]
    async fn beyond_the_hot_ring_spares_wait() {
        let pool = Pool::new(4);
        let n = HOT as u32 + 10;
        for i in 0..n {
            pool.reserve();
            pool.release(i);
        }
        // Sequential traffic rotates over the ring only.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 * n {
            let i = pool.acquire().await.unwrap();
            seen.insert(i);
            pool.release(i);
        }
        assert_eq!(seen, (0..HOT as u32).collect());
        // Concurrent demand beyond the ring uses the spares.
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(pool.acquire().await.unwrap());
        }
        held.sort();
        assert_eq!(held, (0..n).collect::<Vec<_>>());

        // Rotation over every instance when asked.
        let pool = Pool::with_rotation(4, 0);
        for i in 0..n {
            pool.reserve();
            pool.release(i);
        }
        for i in 0..n {
            let got = pool.acquire().await.unwrap();
            assert_eq!(got, i);
            pool.release(got);
        }
    }

    #[tokio::test]
    async fn waits_then_refuses_when_queue_full() {
        let pool = std::sync::Arc::new(Pool::new(1));
        pool.reserve();
        pool.release(1);
        let held = pool.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        tokio::task::yield_now().await;
        while pool.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.acquire().await, Err(Busy::QueueFull));
        pool.release(held);
        assert_eq!(waiter.await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn nothing_up_is_refused_and_waiters_are_released() {
        let pool = std::sync::Arc::new(Pool::<u32>::new(8));
        assert_eq!(pool.acquire().await, Err(Busy::NoneUp));
        pool.reserve();
        pool.release(7);
        let held = pool.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        while pool.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        let _ = held;
        pool.gone();
        assert_eq!(waiter.await.unwrap(), Err(Busy::NoneUp));
    }
}
