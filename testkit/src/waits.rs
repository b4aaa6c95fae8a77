//! Waiting on a condition the way every test here waits: polling with a
//! timeout, and a message that says what never happened.

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits until `cond` returns `Some`, polling every 50 ms, or panics with
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
