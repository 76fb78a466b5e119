//! Simulated event objects: compact storage and the JSON KnowBe4 would send.
//!
//! An event is stored as its id, its `occurred_date` in milliseconds and a 64-bit seed;
//! every other field (user, type, risk, metadata, ...) is derived from the seed when the
//! event is serialised. That keeps 200,000 events in a few tens of megabytes while every
//! request still sees the same, realistic-looking object for the same event.

use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

/// One event type as `GET /event_types` lists it: (id, name, description).
pub(crate) const EVENT_TYPES: &[(u64, &str, Option<&str>)] = &[
    (
        1,
        "security_incident",
        Some("A security incident that involved the user"),
    ),
    (
        2,
        "dlp_violation",
        Some("A data loss prevention policy was triggered"),
    ),
    (
        3,
        "malware_infection",
        Some("Endpoint protection found malware on the user's device"),
    ),
    (
        4,
        "compromised_credentials",
        Some("The user's credentials appeared in a breach corpus"),
    ),
    (
        5,
        "mfa_fatigue",
        Some("The user approved an MFA prompt they did not start"),
    ),
    (6, "usb_storage", None),
    (
        7,
        "good_catch",
        Some("The user reported a real phishing email"),
    ),
];

const FIRST_NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "wendy",
];
const LAST_NAMES: &[&str] = &[
    "smith", "jones", "garcia", "müller", "nguyen", "okafor", "rossi", "tanaka", "dubois",
    "kowalski",
];
const SOURCES: &[Option<&str>] = &[
    Some("Okta"),
    Some("CrowdStrike"),
    Some("Microsoft Defender"),
    Some("Proofpoint"),
    Some("custom-integration"),
    None,
];

/// A deterministic stream of numbers from one seed (SplitMix64), so derived fields
/// never depend on the `rand` crate's algorithm choices.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// The index into [`EVENT_TYPES`] of the event with this seed (used to sort by type).
pub(crate) fn event_type_index(seed: u64) -> usize {
    (Mix(seed).next() % EVENT_TYPES.len() as u64) as usize
}

/// Formats a UUID stored as a `u128` the way KnowBe4 does (lowercase, hyphenated).
pub(crate) fn id_string(id: u128) -> String {
    Uuid::from_u128(id).hyphenated().to_string()
}

/// Parses an event id; `None` when it is not a UUID (such an event cannot exist).
pub(crate) fn parse_id(text: &str) -> Option<u128> {
    Uuid::parse_str(text).ok().map(|id| id.as_u128())
}

/// Formats Unix milliseconds as KnowBe4 does: `2022-08-09T10:05:13.890Z`.
pub(crate) fn format_millis(ms: i64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Unix milliseconds of an `OffsetDateTime`.
pub(crate) fn millis_of(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The event type object of the type at `index`.
pub(crate) fn event_type_json(index: usize) -> Value {
    let (id, name, description) = EVENT_TYPES[index];
    json!({ "id": id, "name": name, "description": description })
}

/// An event as serialised; field order follows KnowBe4's documentation.
#[derive(Serialize)]
struct EventOut {
    id: String,
    account_id: u64,
    user: UserOut,
    external_id: Option<String>,
    source: Option<&'static str>,
    description: Option<String>,
    occurred_date: String,
    risk: RiskOut,
    metadata: Value,
    event_type: TypeOut,
}

#[derive(Serialize)]
struct UserOut {
    email: String,
    id: u64,
    archived: bool,
}

#[derive(Serialize)]
struct RiskOut {
    level: i64,
    factor: f64,
    decay_mode: u64,
    expire_date: Option<String>,
}

#[derive(Serialize)]
struct TypeOut {
    id: u64,
    name: &'static str,
    description: Option<&'static str>,
}

/// The full event object, as KnowBe4's `GET /events` would list it.
pub(crate) fn event_json(account_id: u64, id: u128, occurred_ms: i64, seed: u64) -> String {
    let mut mix = Mix(seed);
    let type_index = (mix.next() % EVENT_TYPES.len() as u64) as usize;
    let user_index = mix.below((FIRST_NAMES.len() * LAST_NAMES.len()) as u64) as usize;
    let first = FIRST_NAMES[user_index % FIRST_NAMES.len()];
    let last = LAST_NAMES[user_index / FIRST_NAMES.len()];
    let source = SOURCES[mix.below(SOURCES.len() as u64) as usize];
    let external_id = mix
        .percent(70)
        .then(|| format!("ext-{:08x}", mix.next() as u32));
    let description = match mix.below(4) {
        0 => None,
        1 => Some(format!(
            "{first} triggered a rule on wks-{:04}",
            mix.below(10_000)
        )),
        // Non-ASCII and characters that need escaping, to test pass-through.
        2 => Some("Zugriff verweigert – Büro München \u{1F512}".to_string()),
        _ => Some(format!(
            "Blocked \"invoice.zip\" at C:\\Users\\{first}\\Downloads (rule #{})",
            mix.below(500)
        )),
    };
    let level = mix.below(21) as i64 - 10;
    let factor = (mix.below(50) + 1) as f64 / 10.0;
    let decay_mode = mix.below(2);
    let expire_date = mix.percent(70).then(|| {
        let days = 30 + mix.below(61) as i64;
        format_millis(occurred_ms + days * 86_400_000)
    });
    let metadata = if mix.percent(55) {
        json!({
            "ip": format!("198.51.100.{}", mix.below(255)),
            "hostname": format!("wks-{:04}", mix.below(10_000)),
            "detector": source,
            "tags": ["sim", EVENT_TYPES[type_index].1],
            "counts": { "attempts": mix.below(9) + 1 },
        })
    } else {
        Value::Null
    };
    let (type_id, type_name, type_description) = EVENT_TYPES[type_index];
    let event = EventOut {
        id: id_string(id),
        account_id,
        user: UserOut {
            email: format!("{first}.{last}@example.com"),
            id: 1_000_000 + user_index as u64,
            archived: user_index.is_multiple_of(37),
        },
        external_id,
        source,
        description,
        occurred_date: format_millis(occurred_ms),
        risk: RiskOut {
            level,
            factor,
            decay_mode,
            expire_date,
        },
        metadata,
        event_type: TypeOut {
            id: type_id,
            name: type_name,
            description: type_description,
        },
    };
    serde_json::to_string(&event).unwrap_or_default()
}
