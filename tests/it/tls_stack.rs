//! Issue 10, finding 10: one TLS stack ships. The AWS SDK's default features used to
//! add rustls 0.21, rustls-webpki 0.101, hyper 0.14 and h2 0.3 (open advisories) beside
//! the current stack. `Cargo.lock` lists every package any target of the crate can
//! build, so what it does not list cannot ship (the same check as `cargo tree -i`).

use std::collections::BTreeMap;

/// Every `(name, version)` in `Cargo.lock`.
fn locked_packages() -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("Cargo.lock");
    let mut packages = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(value) = line.strip_prefix("name = ") {
            name = Some(value.trim_matches('"').to_string());
        } else if let Some(value) = line.strip_prefix("version = ")
            && let Some(name) = name.take()
        {
            packages.push((name, value.trim_matches('"').to_string()));
        }
    }
    packages
}

#[test]
fn one_tls_stack_is_locked() {
    let packages = locked_packages();
    assert!(
        packages.len() > 100,
        "the Cargo.lock scan found {packages:?}"
    );
    let mut versions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, version) in &packages {
        versions.entry(name).or_default().push(version);
    }
    for (name, old) in [
        ("rustls", "0.21."),
        ("rustls-webpki", "0.101."),
        ("hyper", "0.14."),
        ("h2", "0.3."),
        ("hyper-rustls", "0.24."),
        ("tokio-rustls", "0.24."),
        ("http", "0.2."),
    ] {
        let found = versions.get(name).cloned().unwrap_or_default();
        assert!(
            !found.iter().any(|v| v.starts_with(old)),
            "{name} {old}x is in Cargo.lock ({found:?}): check `cargo tree -i {name}@{}`",
            old.trim_end_matches('.')
        );
    }
    for name in ["rustls", "hyper", "h2", "rustls-webpki"] {
        let found = versions.get(name).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "{name}: {found:?} (one version only)");
    }
}
