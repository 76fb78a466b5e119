//! Integration tests: the collector against moto (DynamoDB, Secrets Manager), the
//! KnowBe4 simulator and a recording destination. One binary, as zero2prod does.

mod cli;
mod collect;
mod fuzz;
mod helpers;
mod hostile;
mod lifecycle;
mod operator;
mod payloads;
mod readings;
mod recorded;
mod secrets;
