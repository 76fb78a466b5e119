//! Integration tests: the collector against moto (DynamoDB, Secrets Manager), the
//! KnowBe4 simulator and a recording destination. One binary, as zero2prod does.

mod accounts;
mod cli;
mod collect;
mod fanout;
mod fields;
mod fuzz;
mod generations;
mod helpers;
mod hostile;
mod lambda_logs;
mod lifecycle;
mod loopback;
mod operator;
mod payloads;
mod phishing;
mod phishing_readings;
mod plain_http;
mod readings;
mod recorded;
mod redirects;
mod replies;
mod reporting;
mod secret_names;
mod secrets;
mod state_file;
mod stored_urls;
mod tls_stack;
mod update_secrets;
