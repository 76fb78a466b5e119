//! Property tests of the two parsers that take untrusted JSON: the hosted source document
//! (`config::parse_source_value`) and the Lambda payload (`app::Action::from_payload`).
//!
//! - arbitrary JSON never panics either parser, and every rejection is an
//!   `InvalidConfig` that names a field;
//! - a valid document with one key dropped, retyped, added or pushed out of range is
//!   accepted, or rejected naming that key;
//! - an API key (a canary) never appears in a rejection;
//! - invalid create payloads, through `App::handle` in local mode, store nothing.

use knowbe4_source::Error;
use knowbe4_source::app::Action;
use knowbe4_source::config::{ValidationOptions, parse_source_value};
use knowbe4_source::testkit::recording_sink::RecordingSink;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};

use crate::helpers::{deadline, local_app};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Regressions are kept as the explicit cases below, not as files beside the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every combination of the deployment's validation switches.
const OPTIONS: [ValidationOptions; 4] = [
    ValidationOptions {
        allow_custom_base_url: false,
        key_optional: false,
    },
    ValidationOptions {
        allow_custom_base_url: true,
        key_optional: false,
    },
    ValidationOptions {
        allow_custom_base_url: false,
        key_optional: true,
    },
    ValidationOptions {
        allow_custom_base_url: true,
        key_optional: true,
    },
];

/// The field of a rejection; anything but `InvalidConfig` fails the property.
fn rejected_field(err: &Error) -> Result<String, TestCaseError> {
    match err {
        Error::InvalidConfig { field, .. } => {
            prop_assert!(!field.is_empty(), "a rejection names no field: {err}");
            Ok(field.clone())
        }
        other => Err(TestCaseError::fail(format!(
            "not an InvalidConfig: {other:?}"
        ))),
    }
}

// ---- Arbitrary JSON -------------------------------------------------------------------

/// Keys the parsers know, so random objects hit real paths as well as unknown ones.
const KNOWN_KEYS: &[&str] = &[
    "api.version",
    "source",
    "config",
    "schemaRef",
    "type",
    "sourceType",
    "name",
    "description",
    "category",
    "fields",
    "_siemForward",
    "baseURL",
    "region",
    "apiKey",
    "licensedUsers",
    "dailyRequestLimit",
    "quotaShare",
    "firstFetchLookbackHours",
    "retryWindowMinutes",
    "latenessWindowMinutes",
    "destination",
    "format",
    "url",
    "token",
    "action",
    "sourceId",
    "id",
    "detail-type",
];

/// Strings the parsers give meaning to, and hostile ones.
const TRICKY_STRINGS: &[&str] = &[
    "",
    " ",
    "****",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-0",
    "v1",
    "KnowBe4",
    "Universal",
    "US",
    "eu",
    "MOON",
    "sumo",
    "splunk-hec",
    "ndjson",
    "stdout",
    "training.knowbe4.com",
    "https://api-eu.events.knowbe4.com/",
    "http://127.0.0.1:8787",
    "https://user:pass@evil.example.com",
    "javascript:alert(1)",
    "https://[::1]:99999",
    "create",
    "collect",
    "update",
    "restart",
    "delete",
    "status",
    "health",
    "list",
    ".",
    "Scheduled Event",
    "aws.events",
    "aws.scheduler",
    "\u{0}",
    "a\u{7}b",
    "line\nbreak",
    "\u{202e}reversed",
    "\u{1F512}🔒",
    "\u{FEFF}",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        4 => proptest::sample::select(TRICKY_STRINGS).prop_map(str::to_string),
        1 => "[\\x00-\\x1f\\x7f]{1,8}",
        1 => (1usize..100_000).prop_map(|n| "k".repeat(n)),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(KNOWN_KEYS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// Numbers, including ones no field accepts.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        proptest::sample::select(
            &[
                "0",
                "-0",
                "-1",
                "0.5",
                "1",
                "1.0000001",
                "4294967295",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "1e308",
                "-1e308",
                "5e-324",
                "123456789012345678901234567890",
            ][..]
        )
        .prop_map(|t| serde_json::from_str::<Value>(t).unwrap()),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// Random JSON, and random values placed where the parsers look.
fn shaped_input() -> impl Strategy<Value = Value> {
    prop_oneof![
        json_value(),
        proptest::collection::vec((key(), json_value()), 0..8).prop_map(|config| {
            let config: Map<String, Value> = config.into_iter().collect();
            json!({"api.version": "v1", "source": {"config": config}})
        }),
        (
            key(),
            json_value(),
            proptest::collection::vec((key(), json_value()), 0..4)
        )
            .prop_map(|(action, value, rest)| {
                let mut payload: Map<String, Value> = rest.into_iter().collect();
                payload.insert("action".into(), Value::String(action));
                payload.insert("source".into(), value);
                Value::Object(payload)
            }),
    ]
}

/// `{"action": ""}` names an empty field; kept out of the properties so they keep
/// checking everything else, and tested on its own below.
fn has_empty_action(payload: &Value) -> bool {
    payload.get("action").and_then(Value::as_str) == Some("")
}

/// An unknown key `""` next to `source` names an empty field; kept out of the properties
/// like the empty action, and tested on its own below.
fn has_empty_root_key(document: &Value) -> bool {
    document
        .as_object()
        .is_some_and(|root| root.contains_key("source") && root.contains_key(""))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_json_never_panics_the_source_parser(value in shaped_input()) {
        for options in OPTIONS {
            if let Err(err) = parse_source_value(value.clone(), options)
                && !has_empty_root_key(&value)
            {
                rejected_field(&err)?;
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics_the_payload_parser(value in shaped_input()) {
        if let Err(err) = Action::from_payload(value.clone())
            && !has_empty_action(&value)
        {
            rejected_field(&err)?;
        }
    }
}

#[test]
fn an_empty_unknown_key_is_rejected_naming_a_field() {
    let mut document = valid_document("k-123");
    document[""] = json!(1);
    match parse_source_value(document, OPTIONS[0]) {
        Err(Error::InvalidConfig { field, .. }) => assert!(!field.is_empty()),
        other => panic!("{:?}", other.err()),
    }
}

/// A document with `api.version` but no `source` is taken as the source object itself,
/// and the rejection then names `source.api.version`, a field nobody wrote.
#[test]
fn a_document_without_source_is_rejected_naming_source() {
    let mut document = valid_document("k-123");
    document.as_object_mut().unwrap().remove("source");
    match parse_source_value(document, OPTIONS[0]) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "source"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn an_empty_action_name_is_rejected_naming_the_action() {
    let err = Action::from_payload(json!({"action": ""})).unwrap_err();
    match err {
        Error::InvalidConfig { field, .. } => assert_eq!(field, "action"),
        other => panic!("{other:?}"),
    }
}

// ---- Mutations of a valid document ----------------------------------------------------

/// A hosted document using every key, accepted as is.
fn valid_document(api_key: &str) -> Value {
    json!({
        "api.version": "v1",
        "source": {
            "config": {
                "name": "KnowBe4",
                "description": "Test Source",
                "category": "security/knowbe4",
                "fields": {"_siemForward": true, "team": "secops"},
                "baseURL": "https://training.knowbe4.com",
                "region": "US",
                "apiKey": api_key,
                "licensedUsers": 50,
                "dailyRequestLimit": 500,
                "quotaShare": 0.5,
                "firstFetchLookbackHours": 24,
                "retryWindowMinutes": 90,
                "latenessWindowMinutes": 60,
                "destination": {
                    "format": "splunk-hec",
                    "url": "https://hec.example.com:8088",
                    "token": "hec-token"
                }
            },
            "schemaRef": {"type": "KnowBe4"},
            "sourceType": "Universal"
        }
    })
}

/// Every key path of `value` (objects only), e.g. `["source", "config", "name"]`.
fn paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            prefix.push(key.clone());
            out.push(prefix.clone());
            paths(child, prefix, out);
            prefix.pop();
        }
    }
}

/// Paths of the objects of `value` (the root is `[]`).
fn object_paths(value: &Value) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    let mut objects = vec![Vec::new()];
    objects.extend(
        all.into_iter()
            .filter(|p| pointer(value, p).is_some_and(Value::is_object)),
    );
    objects
}

fn pointer<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn pointer_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, key| v.get_mut(key))
}

/// How the valid document is broken.
#[derive(Clone, Debug)]
enum Mutation {
    /// Remove the key at this path.
    Drop(Vec<String>),
    /// Replace the value at this path with one of another JSON type.
    Retype(Vec<String>, Value),
    /// Add a key this object does not know.
    AddUnknown(Vec<String>, String, Value),
    /// Put a number outside its range.
    OutOfRange(Vec<String>, Value),
}

impl Mutation {
    /// The path the mutation touches, as serde names it.
    fn path(&self) -> String {
        match self {
            Mutation::Drop(p) | Mutation::Retype(p, _) | Mutation::OutOfRange(p, _) => p.join("."),
            Mutation::AddUnknown(object, key, _) => {
                let mut p = object.clone();
                p.push(key.clone());
                p.join(".")
            }
        }
    }

    fn apply(&self, doc: &mut Value) {
        match self {
            Mutation::Drop(path) => {
                let (last, parent) = path.split_last().unwrap();
                if let Some(Value::Object(map)) = pointer_mut(doc, parent) {
                    map.remove(last);
                }
            }
            Mutation::Retype(path, value) | Mutation::OutOfRange(path, value) => {
                *pointer_mut(doc, path).unwrap() = value.clone();
            }
            Mutation::AddUnknown(object, key, value) => {
                if let Some(Value::Object(map)) = pointer_mut(doc, object) {
                    map.insert(key.clone(), value.clone());
                }
            }
        }
    }

    /// Whether the mutation makes any document invalid (for the create payload test).
    fn always_invalid(&self) -> bool {
        match self {
            Mutation::OutOfRange(..) => true,
            Mutation::AddUnknown(object, ..) => object.last().is_none_or(|k| k != "fields"),
            Mutation::Drop(path) => matches!(
                path.join(".").as_str(),
                "source.config"
                    | "source.config.name"
                    | "source.config.apiKey"
                    | "source.config.destination.format"
                    | "source.config.destination.url"
                    | "source.config.destination.token"
                    | "source.schemaRef.type"
            ),
            Mutation::Retype(..) => false,
        }
    }
}

fn json_type(value: &Value) -> u8 {
    match value {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

/// Out-of-range values of each numeric key.
fn out_of_range() -> Vec<(&'static str, Vec<Value>)> {
    vec![
        (
            "quotaShare",
            vec![json!(0), json!(-0.5), json!(1.0001), json!(2), json!(1e300)],
        ),
        (
            "dailyRequestLimit",
            vec![
                json!(0),
                json!(-1),
                json!(4_294_967_296u64),
                json!(0.5),
                json!(1e20),
            ],
        ),
        (
            "licensedUsers",
            vec![json!(0), json!(-3), json!(4_294_967_296u64), json!(2.5)],
        ),
        (
            "firstFetchLookbackHours",
            vec![json!(-1), json!(8784.01), json!(1e300), json!(-1e-9)],
        ),
        (
            "retryWindowMinutes",
            vec![json!(0), json!(-1), json!(10080.5), json!(1e300)],
        ),
        (
            "latenessWindowMinutes",
            vec![json!(-1), json!(10080.5), json!(-1e300)],
        ),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let doc = valid_document("k-123");
    let mut all = Vec::new();
    paths(&doc, &mut Vec::new(), &mut all);
    let objects = object_paths(&doc);
    let typed: Vec<(Vec<String>, u8)> = all
        .iter()
        .map(|p| (p.clone(), json_type(pointer(&doc, p).unwrap())))
        .collect();
    let drop = proptest::sample::select(all).prop_map(Mutation::Drop);
    let retype = (proptest::sample::select(typed), json_value()).prop_filter_map(
        "another type",
        |((path, kind), value)| {
            (json_type(&value) != kind).then_some(Mutation::Retype(path, value))
        },
    );
    let unknown = (
        proptest::sample::select(objects),
        "[a-zA-Z_][a-zA-Z0-9_]{0,12}",
        leaf(),
    )
        .prop_filter_map("an unknown key", |(object, key, value)| {
            let known = pointer(&valid_document("k"), &object)
                .and_then(|o| o.get(&key))
                .is_some()
                || KNOWN_KEYS.contains(&key.as_str());
            (!known).then_some(Mutation::AddUnknown(object, key, value))
        });
    let range = proptest::sample::select(out_of_range()).prop_flat_map(|(key, values)| {
        proptest::sample::select(values).prop_map(move |value| {
            Mutation::OutOfRange(
                vec!["source".into(), "config".into(), key.to_string()],
                value,
            )
        })
    });
    prop_oneof![drop, retype, unknown, range]
}

/// Whether `field` names the mutated path: the path itself, a place inside the value put
/// there (`source.schemaRef[0]`), or, for a key serde found missing, its parent with the
/// key in the message.
fn names(err: &Error, mutation: &Mutation) -> bool {
    let Error::InvalidConfig { field, message } = err else {
        return false;
    };
    let path = mutation.path();
    if *field == path
        || field.starts_with(&format!("{path}."))
        || field.starts_with(&format!("{path}["))
    {
        return true;
    }
    let (parent, key) = path.rsplit_once('.').unwrap_or(("", &path));
    let parent = if parent.is_empty() { "source" } else { parent };
    field == parent && message.contains(&format!("`{key}`"))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_mutated_document_is_accepted_or_rejected_naming_the_key(mutation in mutation()) {
        let mut doc = valid_document("k-123");
        mutation.apply(&mut doc);
        for options in OPTIONS {
            let key_dropped = mutation.path() == "source.config.apiKey";
            match parse_source_value(doc.clone(), options) {
                Ok(_) => prop_assert!(
                    !mutation.always_invalid() || (key_dropped && options.key_optional),
                    "{mutation:?} was accepted"
                ),
                Err(err) => {
                    rejected_field(&err)?;
                    // Known to name `source.api.version`: tested on its own above.
                    let source_dropped = mutation.path() == "source"
                        && matches!(mutation, Mutation::Drop(_));
                    prop_assert!(
                        names(&err, &mutation) || source_dropped,
                        "{mutation:?} rejected as {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_canary_key_never_appears_in_a_rejection(
        suffix in "[a-z0-9]{8,16}",
        mutation in mutation(),
        breakage in 0usize..7,
    ) {
        let canary = format!("canary-{suffix}");
        let key = match breakage {
            0 => canary.clone(),
            1 => format!("{canary} {canary}"),
            2 => format!("{canary}\u{7}"),
            3 => format!("{canary}{}", "x".repeat(5_000)),
            4 => format!("\t{canary}\n{canary}"),
            5 => format!("{canary}\u{0}"),
            _ => canary.clone(),
        };
        let mut doc = valid_document(&key);
        mutation.apply(&mut doc);
        let at = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        if let Some(Value::Object(config)) = pointer_mut(&mut doc, &at(&["source", "config"]))
            && breakage == 6
        {
            // The key pasted into a numeric field by mistake.
            config.insert("quotaShare".into(), json!(canary));
        }
        // The canary in the other secret places, too: a destination URL and token.
        if let Some(Value::Object(destination)) =
            pointer_mut(&mut doc, &at(&["source", "config", "destination"]))
            && breakage % 2 == 1
        {
            destination.insert("url".into(), json!(format!("ftp://hec.example/{canary}")));
            destination.insert("token".into(), json!(format!("{canary}\r\n")));
        }
        for options in OPTIONS {
            if let Err(err) = parse_source_value(doc.clone(), options) {
                let shown = format!("{err} {err:?}");
                prop_assert!(!shown.contains(&canary), "{shown}");
            }
        }
        let payload = json!({"action": "create", "source": doc, "id": suffix});
        if let Err(err) = Action::from_payload(payload) {
            let shown = format!("{err} {err:?}");
            prop_assert!(!shown.contains(&canary), "{shown}");
        }
    }
}

/// A create payload that cannot be valid: a broken document, or a good one with an
/// unusable id or an unknown payload key.
fn invalid_create_payload() -> impl Strategy<Value = Value> {
    let broken = mutation()
        .prop_filter("always invalid", Mutation::always_invalid)
        .prop_map(|mutation| {
            let mut doc = valid_document("canary-create");
            mutation.apply(&mut doc);
            json!({"action": "create", "source": doc})
        });
    let bad_id = prop_oneof![
        Just(json!("")),
        Just(json!("../escape")),
        Just(json!("a b")),
        Just(json!("x".repeat(65))),
        Just(json!(42)),
        Just(json!(["id"])),
    ]
    .prop_map(
        |id| json!({"action": "create", "source": valid_document("canary-create"), "id": id}),
    );
    let extra = ("[a-z]{1,8}", leaf())
        .prop_filter("unknown", |(k, _)| {
            k != "source" && k != "id" && k != "action"
        })
        .prop_map(|(k, v)| {
            let mut payload =
                json!({"action": "create", "source": valid_document("canary-create")});
            payload[k] = v;
            payload
        });
    let not_a_document =
        json_value().prop_map(|source| json!({"action": "create", "source": source}));
    prop_oneof![3 => broken, 1 => bad_id, 1 => extra, 1 => not_a_document]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_create_payloads_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let app = local_app(dir.path(), &sink);
    let mut runner = TestRunner::deterministic();
    let strategy = invalid_create_payload();
    for n in 0..50 {
        let payload = strategy.new_tree(&mut runner).unwrap().current();
        let result = match Action::from_payload(payload.clone()) {
            Ok(action) => app.handle(action, deadline(10)).await,
            Err(err) => Err(err),
        };
        match result {
            Err(Error::InvalidConfig { field, .. }) => {
                assert!(!field.is_empty(), "payload {n}: {payload}")
            }
            other => panic!("payload {n} was not rejected as invalid: {other:?}\n{payload}"),
        }
        let stored: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(
            stored.is_empty(),
            "payload {n} left {stored:?} behind\n{payload}"
        );
    }
    assert!(sink.requests().is_empty());
}
