//! Model substitution in multipart/form-data bodies: never panics, and what the layer would
//! send reads back as the substituted model.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_model_fallback::__private::{multipart_model, substitute_multipart};

const BOUNDARIES: &[&str] = &["XyZ", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a", "--"];
const MODELS: &[&str] = &["whisper-1", "gpt-4o-transcribe", "", "mödel", "--XyZ"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let boundary = BOUNDARIES[usize::from(pick & 0x0f) % BOUNDARIES.len()];
    let model = MODELS[usize::from(pick >> 4) % MODELS.len()];
    let input = Bytes::copy_from_slice(body);
    let Some(parts) = substitute_multipart(&input, boundary, model) else {
        return;
    };
    let output: Vec<u8> = parts.concat();
    // A model that holds the boundary can move the part ends; anything else reads back.
    if !model.contains(boundary) {
        assert_eq!(
            multipart_model(&output, boundary).as_deref(),
            Some(model),
            "the substituted model reads back"
        );
    }
});
