//! The serde_json candidate measured against the library's purpose-built scanner (see
//! `../substitute.rs`): serde_json validates the body and lends each top-level value as a
//! `RawValue`, whose offset in the body gives the model's span. It lost on time and on
//! instruction count at every size, so the library keeps its scanner; this stays so the
//! comparison can be re-run.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

#[allow(dead_code)] // `Insert` is the full answer; the bench body always has a model.
pub enum ModelSlots {
    Replace(Vec<Range<usize>>),
    Insert { brace: usize, empty: bool },
}

/// Validates `buf` as one JSON object and finds its top-level `"model"` members.
///
/// serde_json does the validation and lends each top-level value as a `RawValue` slice of `buf`,
/// from which the spans are taken; keys are compared without allocating (escaped spellings such as
/// `"mod\u0065l"` included). Values are skipped with serde_json's explicit stack, so nesting depth
/// cannot overflow the thread's stack.
pub fn locate(buf: &[u8]) -> Result<ModelSlots, String> {
    let mut de = serde_json::Deserializer::from_slice(buf);
    let found = serde::Deserializer::deserialize_map(&mut de, TopLevel { base: buf })
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    let mut spans = found.spans.into_iter();
    Ok(match spans.next() {
        Some(first) => ModelSlots::Replace(std::iter::once(first).chain(spans).collect()),
        None => {
            let brace = buf
                .iter()
                .position(|b| *b == b'{')
                .ok_or("no opening brace")?;
            ModelSlots::Insert {
                brace,
                empty: found.members == 0,
            }
        }
    })
}

/// The top-level object: where its model values are and how many members it has.
struct TopLevel<'a> {
    base: &'a [u8],
}

struct Found {
    spans: Vec<Range<usize>>,
    members: usize,
}

impl<'de> Visitor<'de> for TopLevel<'de> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found {
            spans: Vec::new(),
            members: 0,
        };
        while let Some(IsModel(is_model)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            found.members += 1;
            if is_model {
                // The value is a slice of `base`; its offset is the distance between the two.
                let raw = value.get().as_bytes();
                let start = (raw.as_ptr() as usize).wrapping_sub(self.base.as_ptr() as usize);
                let end = start.wrapping_add(raw.len());
                if self.base.get(start..end) != Some(raw) {
                    return Err(de::Error::custom("model value outside the body"));
                }
                found.spans.push(start..end);
            }
        }
        Ok(found)
    }
}

/// A key, reduced to whether it is `model`.
struct IsModel(bool);

impl<'de> Deserialize<'de> for IsModel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = IsModel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<IsModel, E> {
                Ok(IsModel(key == "model"))
            }
        }
        deserializer.deserialize_str(Key)
    }
}
