//! No input may panic the receiver: the parsers and verifiers under arbitrary bytes, arbitrary
//! JSON, and real payloads with arbitrary values put into their fields.

use driftless::settings::Secret;
use driftless::webhook::gitlab::{GitlabSecrets, ProofHeaders};
use driftless::webhook::{github, gitlab, Event};
use proptest::prelude::*;
use serde_json::Value;

use crate::support::fixture;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,48}".prop_map(Value::String),
        "[0-9a-f]{40}".prop_map(Value::String),
        "refs/(heads|tags)/[a-z/]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("ref".to_string()),
                    Just("before".to_string()),
                    Just("after".to_string()),
                    Just("repository".to_string()),
                    Just("project".to_string()),
                    Just("full_name".to_string()),
                    Just("path_with_namespace".to_string()),
                    Just("object_kind".to_string()),
                    Just("hook_id".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A real payload with one top-level or nested field replaced by an arbitrary value.
fn mutate(mut base: Value, path: &[&str], value: Value) -> Vec<u8> {
    let mut cur = &mut base;
    for (i, key) in path.iter().enumerate() {
        if i + 1 == path.len() {
            cur[*key] = value.clone();
        } else {
            cur = &mut cur[*key];
        }
    }
    serde_json::to_vec(&base).unwrap()
}

const GITHUB_EVENTS: [&str; 3] = ["push", "ping", "issues"];
const GITLAB_EVENTS: [&str; 3] = ["Push Hook", "Tag Push Hook", "Note Hook"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512), e in 0usize..3) {
        let _ = github::parse(GITHUB_EVENTS[e], &body);
        let _ = gitlab::parse(GITLAB_EVENTS[e], &body);
    }

    #[test]
    fn parsers_never_panic_on_json(v in arb_json(), e in 0usize..3) {
        let body = serde_json::to_vec(&v).unwrap();
        let _ = github::parse(GITHUB_EVENTS[e], &body);
        let _ = gitlab::parse(GITLAB_EVENTS[e], &body);
    }

    #[test]
    fn real_payloads_with_arbitrary_fields(
        v in arb_json(),
        field in prop::sample::select(vec![
            vec!["ref"], vec!["before"], vec!["after"], vec!["created"], vec!["deleted"],
            vec!["forced"], vec!["repository"], vec!["repository", "full_name"],
            vec!["project"], vec!["project", "path_with_namespace"], vec!["object_kind"],
        ]),
    ) {
        let gh: Value = serde_json::from_slice(&fixture("github/push-5.json")).unwrap();
        let body = mutate(gh, &field, v.clone());
        if let Ok(Event::Push(p)) = github::parse("push", &body) {
            // Whatever got through is well-formed.
            prop_assert_eq!(p.after.len(), 40);
            prop_assert_eq!(p.before.len(), 40);
        }
        let gl: Value = serde_json::from_slice(&fixture("gitlab/push.json")).unwrap();
        let body = mutate(gl, &field, v);
        if let Ok(Event::Push(p)) = gitlab::parse("Push Hook", &body) {
            prop_assert_eq!(p.after.len(), 40);
        }
    }

    #[test]
    fn verifiers_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..256),
        sig in prop::collection::vec(any::<u8>(), 0..128),
        id in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        ts in prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
        now in any::<i64>(),
    ) {
        let secrets = [Secret::new("s")];
        prop_assert!(github::verify_signature(&secrets, Some(&sig), &body).is_err());
        let gl = GitlabSecrets::new(&[Secret::new("t")], vec![vec![1, 2, 3]]);
        let headers = ProofHeaders {
            token: Some(&sig),
            signature: Some(&sig),
            id: id.as_deref(),
            timestamp: ts.as_deref(),
        };
        prop_assert!(gitlab::verify(&gl, headers, &body, now).is_err());
    }
}
