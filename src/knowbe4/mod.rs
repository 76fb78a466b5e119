//! The KnowBe4 clients, one per API, each with an injected base URL and tested against
//! the simulator on loopback.
//!
//! - [`events`]: the User Event API (`GET /events`), paced at 4 requests per second.
//! - [`reporting`]: the Reporting API (phishing security tests and their recipients),
//!   paced within 4 requests per second and 50 per minute.

pub mod events;
pub mod reporting;

pub use events::*;
