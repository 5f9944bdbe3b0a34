//! A priced models catalog, as CometAPI's `GET /api/models` returns it: prices of candidate
//! fallbacks before they are added, and the cost of answers that report their `usage`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// A list of models with their prices (USD per million tokens), parsed from the shape of
/// CometAPI's `GET /api/models`:
/// `{"success", "page", "page_size", "total", "data": [{"id", "provider", "model_type",
/// "features", "pricing": {"currency", "input", "output", "per_request", "per_second"},
/// "api_doc_url"}]}`. Any price may be `null`; unknown fields are ignored (it is someone
/// else's API).
///
/// ```
/// use tower_model_fallback::ModelCatalog;
///
/// let catalog = ModelCatalog::from_json(br#"{"success": true, "data": [
///   {"id": "cheap", "features": ["text-to-text"], "pricing": {"currency": "USD / M Tokens", "input": 0.1, "output": 0.4}},
///   {"id": "dear", "features": ["text-to-text"], "pricing": {"input": 2.5, "output": 10.0, "per_request": null}}
/// ]}"#).unwrap();
/// assert_eq!(catalog.price("dear").unwrap().input, Some(2.5));
/// let ids: Vec<&str> = catalog.candidates("text-to-text").iter().map(|m| m.id.as_str()).collect();
/// assert_eq!(ids, ["cheap", "dear"]);
/// // 1000 prompt tokens and 500 completion tokens on "dear":
/// let cost = catalog.estimate_cost("dear", 1000, 500).unwrap();
/// assert!((cost - 0.0075).abs() < 1e-12);
/// ```
#[derive(Debug, Clone)]
pub struct ModelCatalog {
    models: Vec<ModelEntry>,
    by_id: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ModelsPage {
    data: Vec<ModelEntry>,
}

/// One model of a [`ModelCatalog`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[non_exhaustive]
pub struct ModelEntry {
    /// The model ID, as sent in a request's `"model"`.
    pub id: String,
    /// Who serves it.
    #[serde(default)]
    pub provider: Option<String>,
    /// `text`, `image`, …
    #[serde(default)]
    pub model_type: Option<String>,
    /// What it does, e.g. `text-to-text`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Its prices, when known.
    #[serde(default)]
    pub pricing: Option<Pricing>,
    /// Its documentation.
    #[serde(default)]
    pub api_doc_url: Option<String>,
}

/// A model's prices: `input` and `output` in USD per million tokens; `per_request` and
/// `per_second` in USD. Any may be unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[non_exhaustive]
pub struct Pricing {
    /// USD per million prompt tokens.
    #[serde(default)]
    pub input: Option<f64>,
    /// USD per million completion tokens.
    #[serde(default)]
    pub output: Option<f64>,
    /// USD per request.
    #[serde(default)]
    pub per_request: Option<f64>,
    /// USD per second (media models).
    #[serde(default)]
    pub per_second: Option<f64>,
}

impl Pricing {
    /// One number to compare models by: input + output per million tokens, else the price per
    /// request. `None` when neither is known.
    pub fn comparable(&self) -> Option<f64> {
        match (self.input, self.output) {
            (Some(i), Some(o)) => Some(i + o),
            (Some(p), None) | (None, Some(p)) => Some(p),
            (None, None) => self.per_request,
        }
    }

    /// The cost of an answer with these token counts, in USD, when the prices needed are known.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Option<f64> {
        let tokens = match (self.input, self.output) {
            (None, None) => None,
            (i, o) => Some(
                prompt_tokens as f64 * i.unwrap_or(0.0) / 1e6
                    + completion_tokens as f64 * o.unwrap_or(0.0) / 1e6,
            ),
        };
        match (tokens, self.per_request) {
            (None, None) => None,
            (t, r) => Some(t.unwrap_or(0.0) + r.unwrap_or(0.0)),
        }
    }
}

impl ModelCatalog {
    /// Parses a models list.
    pub fn from_json(json: &[u8]) -> Result<ModelCatalog, ConfigError> {
        let page: ModelsPage = serde_json::from_slice(json)
            .map_err(|e| ConfigError::new("models", format!("not a models list: {e}")))?;
        let by_id = page
            .data
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        Ok(ModelCatalog {
            models: page.data,
            by_id,
        })
    }

    /// Reads and parses a models list file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<ModelCatalog, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::new("models", format!("cannot read {}: {e}", path.display()))
        })?;
        ModelCatalog::from_json(&bytes)
    }

    /// Every model, in the list's order.
    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// A model by ID.
    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.by_id.get(id).and_then(|i| self.models.get(*i))
    }

    /// A model's prices.
    pub fn price(&self, id: &str) -> Option<&Pricing> {
        self.get(id)?.pricing.as_ref()
    }

    /// The models with `feature` (e.g. `text-to-text`), cheapest first; unpriced ones last.
    pub fn candidates(&self, feature: &str) -> Vec<&ModelEntry> {
        let mut found: Vec<&ModelEntry> = self
            .models
            .iter()
            .filter(|m| m.features.iter().any(|f| f == feature))
            .collect();
        found.sort_by(|a, b| {
            let (pa, pb) = (
                a.pricing.and_then(|p| p.comparable()),
                b.pricing.and_then(|p| p.comparable()),
            );
            match (pa, pb) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => a.id.cmp(&b.id),
            }
        });
        found
    }

    /// The estimated cost of an answer from `model`, in USD.
    pub fn estimate_cost(
        &self,
        model: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Option<f64> {
        self.price(model)?.cost(prompt_tokens, completion_tokens)
    }
}

/// What to do when a fallback costs more than `max_factor` times the primary.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PriceGuard {
    /// The largest acceptable ratio of a fallback's price to the primary's.
    pub max_factor: f64,
    /// Refuse to build the layer (`true`) or only warn (`false`).
    pub refuse: bool,
}

impl PriceGuard {
    /// Warn about fallbacks priced above `max_factor` times the primary.
    pub fn warn_above(max_factor: f64) -> Self {
        PriceGuard {
            max_factor,
            refuse: false,
        }
    }

    /// Refuse fallbacks priced above `max_factor` times the primary.
    pub fn refuse_above(max_factor: f64) -> Self {
        PriceGuard {
            max_factor,
            refuse: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_prices_give_no_cost() {
        let p = Pricing::default();
        assert_eq!(p.cost(10, 10), None);
        assert_eq!(p.comparable(), None);
        let per_request = Pricing {
            per_request: Some(0.04),
            ..Pricing::default()
        };
        assert_eq!(per_request.cost(0, 0), Some(0.04));
    }
}
