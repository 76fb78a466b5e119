//! The KnowBe4 clients, one per API, each with an injected base URL and tested against
//! the simulator on loopback.
//!
//! - [`events`]: the User Event API (`GET /events`), paced at 4 requests per second.

pub mod events;

pub use events::*;
