//! Model substitution in JSON bodies, against serde_json as the oracle: never panics; accepts
//! exactly the JSON objects serde_json accepts; and the output parses to the input's value with
//! only the top-level `model` set.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tower_model_fallback::__private::substitute;

const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "claude-3-5-haiku-latest",
    "a\"quoted\\model",
    "ünïcödé/模型",
    "line\nbreak\u{2028}",
    "",
];

const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Whether `body` holds a `\uD800`-`\uDFFF` escape: JSON's grammar allows a lone surrogate
/// (RFC 8259, section 8.2) and the layer passes it through, but serde_json's `Value` refuses it.
fn has_surrogate_escape(body: &[u8]) -> bool {
    body.windows(4).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && matches!(w[2], b'd' | b'D')
            && matches!(w[3], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let model = MODELS[usize::from(pick) % MODELS.len()];
    // serde_json's arbitrary-precision numbers travel as a map under this magic key, which
    // would make the oracle misread such an object.
    if body
        .windows(NUMBER_TOKEN.len())
        .any(|w| w == NUMBER_TOKEN.as_bytes())
    {
        return;
    }
    let input = Bytes::copy_from_slice(body);
    let ours = substitute(&input, model);
    let oracle = serde_json::from_slice::<Value>(body);
    match (ours, oracle) {
        (Ok(parts), Ok(Value::Object(mut expected))) => {
            let output: Vec<u8> = parts.concat();
            let got: Value = serde_json::from_slice(&output).expect("the output is JSON");
            expected.insert("model".to_owned(), Value::String(model.to_owned()));
            assert_eq!(got, Value::Object(expected), "only the model changes");
        }
        (Ok(_), Ok(other)) => panic!("accepted a top-level {other:?}"),
        (Ok(_), Err(e)) => {
            let message = e.to_string();
            // serde_json stops at 128 levels of nesting; the scanner has no such limit. A lone
            // surrogate is valid JSON syntax, which serde_json's own syntax check (`IgnoredAny`)
            // accepts.
            let depth = message.contains("recursion limit");
            let surrogate = has_surrogate_escape(body)
                && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
            assert!(
                depth || surrogate,
                "accepted what serde_json rejects: {message}"
            );
        }
        (Err(_), Ok(Value::Object(_))) => {
            panic!("rejected a JSON object serde_json accepts")
        }
        (Err(_), _) => {}
    }
});
