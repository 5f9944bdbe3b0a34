//! Property tests of contract 3: for generated JSON objects, the substituted body is the
//! caller's bytes with only the top-level model values replaced, and it parses to the original
//! value with only the top-level model changed.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use tower_model_fallback::__private::{requested_model, substitute};

fn ws() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", " ", "\n", "\t", "\r\n  ", "   "])
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1e400".to_owned()),
        Just("-1E-400".to_owned()),
        Just("12345678901234567890".to_owned()),
        Just("-0".to_owned()),
        Just("0.50".to_owned()),
        Just("3.0e+2".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
    ]
}

/// A JSON string literal for `s`, in one of several legal spellings.
fn spell(s: &str, style: u8) -> String {
    match style % 3 {
        0 => serde_json::to_string(s).unwrap(),
        1 => {
            let mut out = String::from("\"");
            for unit in s.encode_utf16() {
                out.push_str(&format!("\\u{unit:04X}"));
            }
            out.push('"');
            out
        }
        _ => serde_json::to_string(s).unwrap().replace('/', "\\/"),
    }
}

fn string_literal() -> impl Strategy<Value = String> {
    (any::<String>(), any::<u8>()).prop_map(|(s, style)| spell(&s, style))
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"model\"".to_owned()),
        Just("\"messages\"".to_owned()),
        Just("\"content\"".to_owned()),
        string_literal(),
    ]
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number(),
        string_literal(),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let parts: Vec<String> = items
                    .into_iter()
                    .map(|(a, v, b)| format!("{a}{v}{b}"))
                    .collect();
                format!("[{}]", parts.join(","))
            }),
            prop::collection::vec((ws(), key(), ws(), ws(), inner, ws()), 0..5).prop_map(
                |members| {
                    let parts: Vec<String> = members
                        .into_iter()
                        .map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{v}{d}"))
                        .collect();
                    format!("{{{}}}", parts.join(","))
                }
            ),
        ]
    })
}

/// A top-level member: leading space, key, spaces, value, trailing space; whether it is a model.
#[derive(Debug, Clone)]
struct Member {
    before: &'static str,
    key: String,
    around_colon: (&'static str, &'static str),
    value: String,
    after: &'static str,
    is_model: bool,
}

fn member() -> impl Strategy<Value = Member> {
    let model_key = prop_oneof![
        3 => Just("\"model\"".to_owned()),
        1 => Just("\"mod\\u0065l\"".to_owned()),
    ];
    let plain_key = prop_oneof![
        Just("\"messages\"".to_owned()),
        Just("\"stream\"".to_owned()),
        Just("\"modelx\"".to_owned()),
        Just("\"Model\"".to_owned()),
        string_literal().prop_filter("not model", |k| serde_json::from_str::<String>(k).unwrap()
            != "model"),
    ];
    let key = prop_oneof![1 => model_key.prop_map(|k| (k, true)), 3 => plain_key.prop_map(|k| (k, false))];
    (ws(), key, ws(), ws(), value(), ws()).prop_map(
        |(before, (key, is_model), b, c, value, after)| Member {
            before,
            key,
            around_colon: (b, c),
            value,
            after,
            is_model,
        },
    )
}

fn render(members: &[Member], outer: (&str, &str), replace_with: Option<&str>) -> String {
    let parts: Vec<String> = members
        .iter()
        .map(|m| {
            let value = match replace_with {
                Some(lit) if m.is_model => lit,
                _ => &m.value,
            };
            format!(
                "{}{}{}:{}{}{}",
                m.before, m.key, m.around_colon.0, m.around_colon.1, value, m.after
            )
        })
        .collect();
    format!("{}{{{}}}{}", outer.0, parts.join(","), outer.1)
}

fn model_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("gpt-4o-mini".to_owned()),
        Just("quote\"back\\slash".to_owned()),
        Just("ctrl\u{0}\u{1f}\n\t".to_owned()),
        Just("\u{8}backspace\u{c}formfeed\u{7f}".to_owned()),
        Just("모델-é-😀".to_owned()),
        any::<String>(),
    ]
}

fn run(body: &str, model: &str) -> String {
    let parts =
        substitute(&Bytes::copy_from_slice(body.as_bytes()), model).expect("valid JSON object");
    String::from_utf8(parts.concat()).expect("UTF-8 out")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn only_the_top_level_model_values_change(
        members in prop::collection::vec(member(), 0..6),
        outer in (ws(), ws()),
        model in model_id(),
    ) {
        let input = render(&members, outer, None);
        let literal = serde_json::to_string(&model).unwrap();
        let output = run(&input, &model);

        // Byte-faithful: exactly the caller's bytes with the model values swapped (or one inserted).
        let expected = if members.iter().any(|m| m.is_model) {
            render(&members, outer, Some(&literal))
        } else {
            let brace = input.find('{').unwrap();
            let comma = if members.is_empty() { "" } else { "," };
            format!("{}\"model\":{literal}{comma}{}", &input[..=brace], &input[brace + 1..])
        };
        prop_assert_eq!(&output, &expected);

        // The model the report names: the first top-level one, decoded, when it is a string.
        let asked = members.iter().find(|m| m.is_model).and_then(|m| {
            match serde_json::from_str::<Value>(&m.value).unwrap() {
                Value::String(s) => Some(s),
                _ => None,
            }
        });
        prop_assert_eq!(requested_model(input.as_bytes()), asked);

        // Value-faithful: parses to the original with only the top-level model replaced.
        let mut original: Value = serde_json::from_str(&input).unwrap();
        let substituted: Value = serde_json::from_str(&output).unwrap();
        original.as_object_mut().unwrap().insert("model".to_owned(), Value::String(model.clone()));
        prop_assert_eq!(substituted, original);
    }

    #[test]
    fn any_model_id_is_escaped_into_a_valid_json_string(model in any::<String>()) {
        let out = run(r#"{"model":"x","messages":[{"model":"nested"}]}"#, &model);
        let v: Value = serde_json::from_str(&out).unwrap();
        prop_assert_eq!(v["model"].as_str(), Some(model.as_str()));
        prop_assert_eq!(v["messages"][0]["model"].as_str(), Some("nested"));
    }

    #[test]
    fn the_scanner_agrees_with_serde_json_on_validity(text in "[\\[\\]{}\",:0-9a-z\\\\ .eE+-]{0,40}") {
        // serde_json refuses lone UTF-16 surrogates in `\u` escapes, which JSON's grammar allows.
        prop_assume!(!text.contains("\\u"));
        let ours = substitute(&Bytes::from(text.clone()), "m").is_ok();
        let theirs = serde_json::from_str::<Value>(&text).map(|v| v.is_object()).unwrap_or(false);
        prop_assert_eq!(ours, theirs, "{}", text);
    }
}
