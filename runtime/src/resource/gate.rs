//! The hook between a running guest and the fuel governor.
//!
//! A store with `fuel_async_yield_interval` returns `Pending` to the executor
//! each time the guest has burnt one quantum of fuel; wasmtime wakes the task
//! *during* that poll (a `yield_now`). [`Governed`] wraps a call's future,
//! recognises those yields by that synchronous wake, and before polling the
//! guest again awaits the next quantum from a [`FuelGate`]. A `Pending`
//! without a synchronous wake (a host function waiting on I/O) is passed
//! through: no fuel was burnt for it.
//!
//! The call's wall-clock deadline is kept here too, because time spent
//! waiting for the gate must not count: a subtask the governor suspends is
//! paused, and must not be killed by its deadline for being paused.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::future::BoxFuture;
use tokio::time::{Instant, Sleep};

/// Hands out fuel quanta to one running sandbox.
pub trait FuelGate: Send + Sync + std::fmt::Debug {
    /// Resolves when the holder may burn `fuel` more: at once, later when the
    /// node's fuel budget is spent or others are ahead in line, or only after
    /// a suspended holder is resumed. Dropping the future gives up its place.
    fn acquire(self: Arc<Self>, fuel: u64) -> BoxFuture<'static, ()>;
}

/// The call ran out of wall-clock time (time waiting for the gate excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded;

/// A call's future whose every fuel quantum, the first included, comes from
/// a gate, under a deadline that stops while the gate makes it wait. Without
/// a gate it is the inner future under a plain deadline.
pub struct Governed<F> {
    inner: Pin<Box<F>>,
    gate: Option<Arc<dyn FuelGate>>,
    quantum: u64,
    /// The quantum being waited for (and since when); the guest is not
    /// polled meanwhile.
    waiting: Option<(BoxFuture<'static, ()>, Instant)>,
    started: bool,
    probe: Arc<YieldProbe>,
    deadline: Option<Deadline>,
}

struct Deadline {
    /// When it would fire had the call never waited for the gate.
    base: Instant,
    waited: std::time::Duration,
    timer: Pin<Box<Sleep>>,
}

impl<F: Future> Governed<F> {
    /// `quantum` is the store's fuel yield interval; `deadline` the call's
    /// wall-clock limit (`None`: none).
    pub fn new(
        inner: F,
        gate: Option<Arc<dyn FuelGate>>,
        quantum: u64,
        deadline: Option<std::time::Duration>,
    ) -> Self {
        let deadline = deadline.map(|limit| {
            let now = Instant::now();
            // Like `tokio::time::timeout`, a deadline too far to represent
            // is about thirty years away.
            let base = now
                .checked_add(limit)
                .unwrap_or_else(|| now + std::time::Duration::from_secs(86400 * 365 * 30));
            Deadline {
                base,
                waited: std::time::Duration::ZERO,
                timer: Box::pin(tokio::time::sleep_until(base)),
            }
        });
        Governed {
            inner: Box::pin(inner),
            gate,
            quantum,
            waiting: None,
            started: false,
            probe: Arc::new(YieldProbe::default()),
            deadline,
        }
    }
}

impl<F: Future> Future for Governed<F> {
    type Output = Result<F::Output, DeadlineExceeded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(gate) = &this.gate {
            if !this.started {
                this.started = true;
                this.waiting = Some((gate.clone().acquire(this.quantum), Instant::now()));
            }
        }
        if let Some((waiting, since)) = &mut this.waiting {
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let since = *since;
            this.waiting = None;
            if let Some(d) = &mut this.deadline {
                d.waited += since.elapsed();
                d.timer.as_mut().reset(d.base + d.waited);
            }
        }
        if let Some(d) = &mut this.deadline {
            if d.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(DeadlineExceeded));
            }
        }
        let Some(gate) = &this.gate else {
            return this.inner.as_mut().poll(cx).map(Ok);
        };
        this.probe.arm(cx.waker());
        let waker = Waker::from(this.probe.clone());
        let polled = this.inner.as_mut().poll(&mut Context::from_waker(&waker));
        let yielded = this.probe.disarm();
        if polled.is_pending() && yielded {
            // Queue for the next quantum at once, but give the executor its
            // turn whatever the gate answers: that is what the store yielded
            // for, and a guest that never returns `Pending` starves the other
            // tasks of its thread.
            let mut next = gate.clone().acquire(this.quantum);
            if next.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            } else {
                this.waiting = Some((next, Instant::now()));
            }
        }
        polled.map(Ok)
    }
}

/// The waker the guest sees: notes a wake that happens while the guest is
/// being polled (a fuel yield) instead of rescheduling the task, and passes
/// any later wake to the task's real waker.
#[derive(Default)]
struct YieldProbe {
    polling: AtomicBool,
    woken: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl YieldProbe {
    fn arm(&self, waker: &Waker) {
        let mut slot = self.waker.lock().expect("probe lock");
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        drop(slot);
        self.woken.store(false, Ordering::SeqCst);
        self.polling.store(true, Ordering::SeqCst);
    }

    /// Whether the guest was woken during the poll.
    fn disarm(&self) -> bool {
        self.polling.store(false, Ordering::SeqCst);
        self.woken.swap(false, Ordering::SeqCst)
    }
}

impl Wake for YieldProbe {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        // A wake during the poll is handled by `Governed::poll` itself, which
        // re-polls after the next quantum; forwarding it would only cause a
        // spurious poll. A wake that races with `disarm` is both forwarded
        // and handled, which costs one spurious poll and loses nothing.
        if !self.polling.load(Ordering::SeqCst) {
            if let Some(w) = self.waker.lock().expect("probe lock").as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;

    /// Counts acquisitions; grants at once.
    #[derive(Debug, Default)]
    struct Counting {
        quanta: AtomicU64,
        fuel: AtomicU64,
    }

    impl FuelGate for Counting {
        fn acquire(self: Arc<Self>, fuel: u64) -> BoxFuture<'static, ()> {
            self.quanta.fetch_add(1, Ordering::SeqCst);
            self.fuel.fetch_add(fuel, Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    /// A fuel yield exactly as wasmtime does it: wake during the poll, then
    /// `Pending` once. (`tokio::task::yield_now` defers its wake instead.)
    async fn fuel_yield() {
        let mut yielded = false;
        std::future::poll_fn(move |cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
    }

    /// Like a guest: `yields` fuel yields, then `waits` waits on I/O (woken
    /// later by the timer), then done.
    async fn guest(yields: u32, waits: u32) -> u32 {
        for _ in 0..yields {
            fuel_yield().await;
        }
        for _ in 0..waits {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        7
    }

    #[tokio::test]
    async fn every_fuel_yield_takes_a_quantum_from_the_gate() {
        let gate = Arc::new(Counting::default());
        let out = Governed::new(
            guest(5, 3),
            Some(gate.clone() as Arc<dyn FuelGate>),
            10,
            None,
        )
        .await
        .unwrap();
        assert_eq!(out, 7);
        // The first quantum plus one per yield; the I/O waits take none.
        assert_eq!(gate.quanta.load(Ordering::SeqCst), 6);
        assert_eq!(gate.fuel.load(Ordering::SeqCst), 60);
    }

    /// Even when the gate grants at once, every fuel yield reaches the
    /// executor as a `Pending`, so a guest cannot starve its thread.
    #[test]
    fn every_fuel_yield_still_returns_pending_to_the_executor() {
        let gate = Arc::new(Counting::default());
        let mut fut = std::pin::pin!(Governed::new(
            guest(3, 0),
            Some(gate.clone() as Arc<dyn FuelGate>),
            10,
            None
        ));
        let woken = Arc::new(Flag::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut pendings = 0;
        while fut.as_mut().poll(&mut cx).is_pending() {
            assert!(
                woken.0.swap(false, Ordering::SeqCst),
                "pending without a wake"
            );
            pendings += 1;
        }
        assert_eq!(pendings, 3);
        assert_eq!(gate.quanta.load(Ordering::SeqCst), 4);
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn without_a_gate_the_future_is_unchanged() {
        assert_eq!(Governed::new(guest(3, 1), None, 10, None).await, Ok(7));
    }

    /// Grants only after a signal: the guest must not run meanwhile.
    #[derive(Debug)]
    struct Held(tokio::sync::watch::Receiver<bool>);

    impl FuelGate for Held {
        fn acquire(self: Arc<Self>, _: u64) -> BoxFuture<'static, ()> {
            let mut rx = self.0.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|open| *open).await;
            })
        }
    }

    #[tokio::test]
    async fn the_guest_does_not_run_until_the_gate_grants() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let fut = Governed::new(
            async move {
                flag.store(true, Ordering::SeqCst);
            },
            Some(Arc::new(Held(rx)) as Arc<dyn FuelGate>),
            1,
            None,
        );
        let handle = tokio::spawn(fut);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!ran.load(Ordering::SeqCst), "ran before the first quantum");
        tx.send(true).unwrap();
        handle.await.unwrap().unwrap();
        assert!(ran.load(Ordering::SeqCst));
    }

    /// Time waiting for the gate does not count against the deadline;
    /// time the guest itself takes does.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_while_the_gate_makes_the_call_wait() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let gate = Some(Arc::new(Held(rx)) as Arc<dyn FuelGate>);
        let limit = Some(Duration::from_secs(10));
        // Held back 60 s, then 1 ms of I/O: finishes.
        let handle = tokio::spawn(Governed::new(guest(0, 1), gate.clone(), 1, limit));
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.send(true).unwrap();
        assert_eq!(handle.await.unwrap(), Ok(7));
        // Granted at once, then 20 s of I/O: past the deadline.
        let slow = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
        };
        assert_eq!(
            Governed::new(slow, gate, 1, limit).await,
            Err(DeadlineExceeded)
        );
        // Ungoverned calls have a plain deadline.
        let slow = tokio::time::sleep(Duration::from_secs(20));
        assert_eq!(
            Governed::new(slow, None, 1, limit).await,
            Err(DeadlineExceeded)
        );
    }
}
