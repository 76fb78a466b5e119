//! Test support, compiled only with the `testkit` feature (which the Lambda build does
//! not enable): the tests, benchmarks, `knowbe4-sim` and the demo turn it on.
//!
//! - [`sim`]: a KnowBe4 User Event API simulator on loopback.
//! - [`recording_sink`]: an HTTP destination on loopback that records what it receives.

pub mod recording_sink;
pub mod sim;
