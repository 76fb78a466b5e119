//! Crash-test hooks: `KNOWBE4_SOURCE_FAILPOINT=<name>:<n>` aborts the process (no unwinding,
//! no destructors, like a kill) the `n`-th time the named point is reached. Unset, a hit is
//! one relaxed atomic load. The chaos tests use it to kill the collector between fetching
//! and forwarding, between forwarding and checkpointing, and mid-write of the state file.
//!
//! Armed only in builds with the `testkit` feature; without it (the Lambda build) a hit
//! compiles to nothing and the variable is ignored.

#[cfg(feature = "testkit")]
use std::sync::OnceLock;
#[cfg(feature = "testkit")]
use std::sync::atomic::{AtomicU64, Ordering};

/// Points the code passes through: where a crash matters.
pub const POINTS: [&str; 4] = [
    "before_knowbe4_request",
    "after_fetch_before_forward",
    "after_forward_before_checkpoint",
    "state_file_before_rename",
];

#[cfg(feature = "testkit")]
struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

#[cfg(feature = "testkit")]
fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var("KNOWBE4_SOURCE_FAILPOINT").ok()?;
            let (name, at) = value.split_once(':')?;
            Some(Armed {
                name: name.to_string(),
                at: at.parse().ok()?,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks that `name` was reached; aborts if this is the armed hit.
#[cfg(feature = "testkit")]
pub fn hit(name: &str) {
    if let Some(armed) = armed()
        && armed.name == name
        && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.at
    {
        eprintln!("failpoint {name} reached {} times: aborting", armed.at);
        std::process::abort();
    }
}

/// Marks that `name` was reached: nothing, in a build without the `testkit` feature.
#[cfg(not(feature = "testkit"))]
#[inline(always)]
pub fn hit(_name: &str) {}
