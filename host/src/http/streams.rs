//! Long-lived response streams (plugin log follow): capped in total and per token, apart from
//! the request connection cap, so open streams can never take the connections requests need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Who opened a request, as the auth middleware found out: the index of the token it
/// presented in `[auth] tokens` (`None` on an open API), and whether it may administer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller {
    pub token: Option<usize>,
    pub admin: bool,
}

/// The stream caps and who holds streams now.
#[derive(Debug)]
pub struct StreamLimits {
    total: Arc<Semaphore>,
    max_total: usize,
    per_caller: usize,
    held: Arc<Mutex<HashMap<Caller, usize>>>,
}

/// One open stream; dropping it (the stream ended or the client went away) frees its place.
#[derive(Debug)]
pub struct StreamSlot {
    _total: OwnedSemaphorePermit,
    caller: Caller,
    held: Arc<Mutex<HashMap<Caller, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

impl StreamLimits {
    /// `max_total` streams at once, `per_caller` of them per token (both at least 1).
    pub fn new(max_total: usize, per_caller: usize) -> Self {
        let max_total = max_total.max(1);
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_caller: per_caller.max(1),
            held: Default::default(),
        }
    }

    /// A place for one more stream of `caller`, or why not (a message naming the cap).
    pub fn open(&self, caller: Caller) -> Result<StreamSlot, String> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = held.get(&caller).copied().unwrap_or(0);
        if mine >= self.per_caller {
            return Err(format!(
                "this token has {mine} streams open, its limit ([server] max_streams_per_token)"
            ));
        }
        let Ok(total) = self.total.clone().try_acquire_owned() else {
            return Err(format!(
                "{} streams are open, the server's limit ([server] max_streams)",
                self.max_total
            ));
        };
        held.insert(caller, mine + 1);
        Ok(StreamSlot {
            _total: total,
            caller,
            held: self.held.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_caller_and_in_total() {
        let limits = StreamLimits::new(3, 2);
        let caller = |token| Caller {
            token,
            admin: false,
        };
        let (a, b, c) = (caller(Some(0)), caller(Some(1)), caller(None));
        let a1 = limits.open(a).unwrap();
        let _a2 = limits.open(a).unwrap();
        assert!(
            limits
                .open(a)
                .unwrap_err()
                .contains("max_streams_per_token")
        );
        let _b1 = limits.open(b).unwrap();
        assert!(limits.open(c).unwrap_err().contains("max_streams"));
        drop(a1);
        let _c1 = limits.open(c).unwrap();
        assert!(limits.open(a).is_err(), "the total is full again");
    }
}
