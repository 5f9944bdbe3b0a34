//! `multipart/form-data` bodies (audio transcription, image edits): locating the `model` part and
//! substituting its value, byte-faithful everywhere else.

use std::ops::Range;

use bytes::Bytes;

/// Where the `model` parts of a multipart body are, or where to insert one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelParts {
    boundary: String,
    /// The values of every `name="model"` part.
    values: Vec<Range<usize>>,
    /// Where the first part starts (its delimiter), for inserting a `model` part.
    first_part: usize,
}

/// The boundary of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (name, value) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty() && value.len() <= 70).then(|| value.to_owned())
    })
}

/// Finds the `model` parts; `None` when the body is not well-formed multipart for `boundary`.
pub(crate) fn locate(body: &[u8], boundary: &str) -> Option<ModelParts> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let first_part = if body.starts_with(delimiter) {
        0
    } else {
        find(body, &[b"\r\n", delimiter].concat())? + 2
    };
    let mut values = Vec::new();
    let mut at = first_part;
    loop {
        // `at` is at a delimiter: `--boundary`, then `--` (the end) or CRLF and a part.
        let after = at + delimiter.len();
        let rest = body.get(after..)?;
        if rest.starts_with(b"--") {
            break;
        }
        let headers_start = after + rest.strip_prefix(b"\r\n").map(|_| 2)?;
        let headers_len = find(&body[headers_start..], b"\r\n\r\n")?;
        let headers = &body[headers_start..headers_start + headers_len];
        let content_start = headers_start + headers_len + 4;
        let next = find(&body[content_start..], &[b"\r\n", delimiter].concat())?;
        if is_model_field(headers) {
            values.push(content_start..content_start + next);
        }
        at = content_start + next + 2;
    }
    Some(ModelParts {
        boundary: boundary.to_owned(),
        values,
        first_part,
    })
}

/// A `Content-Disposition: form-data; name="model"` part that is not a file.
fn is_model_field(headers: &[u8]) -> bool {
    let Ok(headers) = std::str::from_utf8(headers) else {
        return false;
    };
    headers.split("\r\n").any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            return false;
        }
        let mut params = value.split(';').map(str::trim);
        let form_data = params
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case("form-data"));
        let mut named_model = false;
        let mut file = false;
        for p in params {
            match p.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("name") => {
                    named_model = v.trim().trim_matches('"') == "model";
                }
                Some((k, _)) if k.trim().eq_ignore_ascii_case("filename") => file = true,
                _ => {}
            }
        }
        form_data && named_model && !file
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl ModelParts {
    /// The body for one target: slices around its model, or a `model` part inserted first.
    /// `None` when the model cannot be a form value (it contains a line break).
    pub(crate) fn splice(&self, body: &Bytes, model: &str) -> Option<Vec<Bytes>> {
        if model.contains(['\r', '\n']) {
            return None;
        }
        let value = Bytes::copy_from_slice(model.as_bytes());
        let mut out = Vec::with_capacity(3);
        if self.values.is_empty() {
            let part = format!(
                "--{}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n",
                self.boundary
            );
            out.push(body.slice(..self.first_part));
            out.push(Bytes::from(part));
            out.push(body.slice(self.first_part..));
        } else {
            let mut at = 0;
            for r in &self.values {
                out.push(body.slice(at..r.start));
                out.push(value.clone());
                at = r.end;
            }
            out.push(body.slice(at..));
        }
        out.retain(|b| !b.is_empty());
        Some(out)
    }

    /// The first `model` value, when it is UTF-8.
    pub(crate) fn requested_model(&self, body: &[u8]) -> Option<std::sync::Arc<str>> {
        let r = self.values.first()?;
        std::str::from_utf8(&body[r.clone()]).ok().map(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\x01model\r\n--XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--XyZ--\r\n";

    fn sub(body: &str, model: &str) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let parts = locate(&bytes, "XyZ").expect("well-formed");
        String::from_utf8(parts.splice(&bytes, model).unwrap().concat()).unwrap()
    }

    #[test]
    fn parses_the_boundary() {
        assert_eq!(
            boundary("multipart/form-data; boundary=XyZ").as_deref(),
            Some("XyZ")
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
    }

    #[test]
    fn replaces_the_model_field_and_nothing_else() {
        let out = sub(BODY, "gpt-4o-transcribe");
        assert_eq!(
            out,
            BODY.replace("\r\n\r\nwhisper-1\r\n", "\r\n\r\ngpt-4o-transcribe\r\n")
        );
        let bytes = Bytes::copy_from_slice(BODY.as_bytes());
        assert_eq!(
            locate(&bytes, "XyZ")
                .unwrap()
                .requested_model(&bytes)
                .as_deref(),
            Some("whisper-1")
        );
    }

    #[test]
    fn inserts_a_model_part_when_there_is_none() {
        let body =
            "--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--XyZ--\r\n";
        let out = sub(body, "m");
        assert_eq!(
            out,
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n{body}")
        );
    }

    #[test]
    fn malformed_bodies_are_not_touched() {
        for body in [
            "",
            "no parts",
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nunterminated",
        ] {
            assert_eq!(locate(body.as_bytes(), "XyZ"), None, "{body:?}");
        }
        let bytes = Bytes::copy_from_slice(BODY.as_bytes());
        assert_eq!(
            locate(&bytes, "XyZ").unwrap().splice(&bytes, "a\r\nb"),
            None
        );
    }
}
