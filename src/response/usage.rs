//! The answer's `usage`, read as it goes by, priced with the catalog.

use std::sync::Arc;

use serde::Deserialize;

use crate::catalog::Pricing;
use crate::report::{BodyCells, Usage};
use crate::resilience::stats::Stats;

/// Watches a non-streamed JSON answer go by and reads its `usage` at the end, without holding
/// more than a few KiB of it.
pub(crate) struct UsageMeter {
    pricing: Option<Pricing>,
    stats: Option<(Stats, usize)>,
    record: Arc<BodyCells>,
    head: Vec<u8>,
    tail: Vec<u8>,
}

const HEAD: usize = 2048;
const TAIL: usize = 4096;

impl UsageMeter {
    pub(crate) fn new(
        pricing: Option<Pricing>,
        stats: Option<(Stats, usize)>,
        record: Arc<BodyCells>,
    ) -> Self {
        UsageMeter {
            pricing,
            stats,
            record,
            head: Vec::new(),
            tail: Vec::new(),
        }
    }

    pub(crate) fn observe(&mut self, chunk: &[u8]) {
        if self.head.len() < HEAD {
            let take = (HEAD - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }

    pub(crate) fn finish(&mut self) {
        let usage = find_usage(&self.tail).or_else(|| find_usage(&self.head));
        let Some((prompt, completion)) = usage else {
            return;
        };
        let cost = self.pricing.and_then(|p| p.cost(prompt, completion));
        tracing::event!(
            target: "tower_model_fallback",
            tracing::Level::DEBUG,
            gen_ai.usage.input_tokens = prompt,
            gen_ai.usage.output_tokens = completion,
            "usage"
        );
        if let Some((stats, target)) = &self.stats {
            stats.usage(*target, prompt, completion, cost);
        }
        let _ = self.record.usage.set(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: cost,
        });
    }
}

/// `prompt_tokens` and `completion_tokens` of the last `"usage": {…}` member in `buf`.
fn find_usage(buf: &[u8]) -> Option<(u64, u64)> {
    #[derive(Deserialize)]
    struct Counts {
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let key = b"\"usage\"";
    let mut end = buf.len();
    while let Some(at) = buf[..end].windows(key.len()).rposition(|w| w == key) {
        end = at;
        if at > 0 && buf[at - 1] == b'\\' {
            continue;
        }
        let rest = buf[at + key.len()..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut values =
            serde_json::Deserializer::from_slice(value.trim_ascii_start()).into_iter::<Counts>();
        if let Some(Ok(c)) = values.next() {
            return Some((c.prompt_tokens, c.completion_tokens));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_wherever_the_provider_puts_it() {
        let last = br#"{"choices":[{"message":{"content":"the \"usage\": x"}}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(find_usage(last), Some((9, 12)));
        let first = br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "choices": []}"#;
        assert_eq!(find_usage(first), Some((3, 4)));
        assert_eq!(find_usage(br#"{"choices":[]}"#), None);
    }

    #[test]
    fn the_meter_reads_usage_across_chunks_and_holds_little() {
        let record = Arc::new(BodyCells::default());
        let pricing = Pricing {
            input: Some(1.0),
            output: Some(2.0),
            ..Pricing::default()
        };
        let mut meter = UsageMeter::new(Some(pricing), None, record.clone());
        let filler = format!(
            r#"{{"choices":[{{"message":{{"content":"{}"}}}}],"#,
            "x".repeat(100_000)
        );
        meter.observe(filler.as_bytes());
        meter.observe(br#""usage":{"prompt_to"#);
        meter.observe(br#"kens":1000000,"completion_tokens":500000}}"#);
        assert!(meter.tail.len() <= 2 * TAIL && meter.head.len() <= HEAD);
        meter.finish();
        let usage = record.usage.get().unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (1_000_000, 500_000)
        );
        assert_eq!(usage.cost_usd, Some(2.0));
    }
}
