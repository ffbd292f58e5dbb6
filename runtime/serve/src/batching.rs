//! How queued requests become model runs: a batch starts with the oldest request, takes the
//! compatible ones held back earlier, then those that arrive within the batching delay, up to
//! the batch's image limit; a batch that memory cannot hold gives its last requests back.
//! Generic over the request (`Batchable`), so that it is tested without a server.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What batching needs to know of a queued request.
pub(crate) trait Batchable {
    /// Images it asks for (`n`).
    fn images(&self) -> usize;
    /// Whether it can share a model run with `first` (the batch's first request).
    fn joins(&self, first: &Self) -> bool;
    /// When it was queued: given-back requests return in this order.
    fn enqueued(&self) -> Instant;
}

/// One receive from the queue.
pub(crate) enum Recv<J> {
    Job(J),
    /// A request that was dropped on arrival (its client went away, its deadline passed).
    Skipped,
    /// Nothing arrived in time.
    Timeout,
    /// Every sender is gone: the server is stopping.
    Closed,
}

/// Requests held back from earlier batches (incompatible, over the limit, given back by
/// admission), in arrival order: they come before anything newer.
pub(crate) struct Batcher<J> {
    held: VecDeque<J>,
}

impl<J: Batchable> Batcher<J> {
    pub(crate) fn new() -> Self {
        Batcher {
            held: VecDeque::new(),
        }
    }

    /// The next batch of at most `max_images` images (a single request may have more on its
    /// own), or None when the queue is closed and nothing is held. `recv(None)` waits for a
    /// request, `recv(Some(d))` at most `d`.
    pub(crate) fn next(
        &mut self,
        max_images: usize,
        max_delay: Duration,
        mut recv: impl FnMut(Option<Duration>) -> Recv<J>,
    ) -> Option<Vec<J>> {
        let first = loop {
            if let Some(j) = self.held.pop_front() {
                break j;
            }
            match recv(None) {
                Recv::Job(j) => break j,
                Recv::Skipped | Recv::Timeout => continue,
                Recv::Closed => return None,
            }
        };
        let mut images = first.images();
        let mut batch = vec![first];
        // Compatible requests already held back, in arrival order.
        let mut i = 0;
        while i < self.held.len() && images < max_images {
            let fits = images + self.held[i].images() <= max_images;
            if fits && self.held[i].joins(&batch[0]) {
                images += self.held[i].images();
                batch.extend(self.held.remove(i));
            } else {
                i += 1;
            }
        }
        // Then whatever arrives within the delay.
        let until = Instant::now() + max_delay;
        while images < max_images {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match recv(Some(left)) {
                Recv::Job(j) => {
                    if images + j.images() <= max_images && j.joins(&batch[0]) {
                        images += j.images();
                        batch.push(j);
                    } else {
                        self.held.push_back(j);
                    }
                }
                Recv::Skipped => continue,
                Recv::Timeout | Recv::Closed => break,
            }
        }
        Some(batch)
    }

    /// Give back the batch's last requests until `fits(images)` or one request is left; they
    /// return to the held queue in arrival order, not ahead of older held requests.
    pub(crate) fn trim(&mut self, batch: &mut Vec<J>, fits: impl Fn(usize) -> bool) {
        while batch.len() > 1 && !fits(images_of(batch)) {
            if let Some(j) = batch.pop() {
                let at = self.held.partition_point(|h| h.enqueued() <= j.enqueued());
                self.held.insert(at, j);
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> Vec<&J> {
        self.held.iter().collect()
    }
}

pub(crate) fn images_of<J: Batchable>(batch: &[J]) -> usize {
    batch.iter().map(Batchable::images).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request: id, images, sampling settings (only equal ones batch), arrival.
    #[derive(Debug, PartialEq)]
    struct R(u32, usize, char, Instant);

    impl Batchable for R {
        fn images(&self) -> usize {
            self.1
        }
        fn joins(&self, first: &Self) -> bool {
            self.2 == first.2
        }
        fn enqueued(&self) -> Instant {
            self.3
        }
    }

    /// A queue that hands out `items` in order, then times out (or says it is closed).
    fn queue(items: Vec<Recv<R>>, closed: bool) -> impl FnMut(Option<Duration>) -> Recv<R> {
        let mut items: VecDeque<Recv<R>> = items.into();
        move |_| {
            items
                .pop_front()
                .unwrap_or(if closed { Recv::Closed } else { Recv::Timeout })
        }
    }

    fn ids(b: &[R]) -> Vec<u32> {
        b.iter().map(|r| r.0).collect()
    }

    #[test]
    fn compatible_requests_share_a_run_up_to_the_limit() {
        let t = Instant::now();
        let mut b = Batcher::new();
        let q = vec![
            Recv::Job(R(1, 1, 'a', t)),
            Recv::Job(R(2, 2, 'b', t)),
            Recv::Skipped,
            Recv::Job(R(3, 2, 'a', t)),
            Recv::Job(R(4, 2, 'a', t)),
            Recv::Job(R(5, 1, 'a', t)),
        ];
        let mut recv = queue(q, true);
        let first = b.next(4, Duration::from_secs(5), &mut recv).unwrap();
        // 1 + 3 + 5 = 4 images; 2 is incompatible, 4 would pass the limit: both held.
        assert_eq!(ids(&first), [1, 3, 5]);
        assert_eq!(b.held().iter().map(|r| r.0).collect::<Vec<_>>(), [2, 4]);
        // The held ones come first, before anything newer.
        let second = b.next(4, Duration::ZERO, &mut recv).unwrap();
        assert_eq!(ids(&second), [2]);
        let third = b.next(4, Duration::ZERO, &mut recv).unwrap();
        assert_eq!(ids(&third), [4]);
        assert!(b.next(4, Duration::ZERO, &mut recv).is_none());
    }

    #[test]
    fn a_request_over_the_limit_runs_alone_and_nothing_waits_past_the_delay() {
        let t = Instant::now();
        let mut b = Batcher::new();
        let mut recv = queue(
            vec![Recv::Job(R(1, 6, 'a', t)), Recv::Job(R(2, 1, 'a', t))],
            false,
        );
        assert_eq!(
            ids(&b.next(4, Duration::from_secs(5), &mut recv).unwrap()),
            [1]
        );
        // With no delay, a batch does not wait for the queue.
        let mut b = Batcher::new();
        let mut calls = 0;
        let batch = b.next(4, Duration::ZERO, |_| {
            calls += 1;
            Recv::Job(R(calls, 1, 'a', t))
        });
        assert_eq!(ids(&batch.unwrap()), [1]);
        assert_eq!(calls, 1);
    }

    #[test]
    fn trimmed_requests_return_in_arrival_order() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let mut b = Batcher::new();
        // Held: 2 (incompatible, arrived at 15 ms).
        let mut recv = queue(
            vec![
                Recv::Job(R(1, 1, 'a', at(0))),
                Recv::Job(R(3, 1, 'a', at(10))),
                Recv::Job(R(2, 1, 'b', at(15))),
                Recv::Job(R(4, 1, 'a', at(20))),
            ],
            true,
        );
        let mut batch = b.next(8, Duration::from_secs(5), &mut recv).unwrap();
        assert_eq!(ids(&batch), [1, 3, 4]);
        // Memory holds 1 image: 4 then 3 go back, around the held 2 by arrival.
        b.trim(&mut batch, |images| images <= 1);
        assert_eq!(ids(&batch), [1]);
        assert_eq!(b.held().iter().map(|r| r.0).collect::<Vec<_>>(), [3, 2, 4]);
        // A single request is never trimmed away (admission then fails it or runs it).
        b.trim(&mut batch, |_| false);
        assert_eq!(ids(&batch), [1]);
    }
}
