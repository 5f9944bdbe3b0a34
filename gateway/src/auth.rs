//! Client authentication: a key from `clients`, sent as `Authorization: Bearer …` (OpenAI's SDKs)
//! or `x-api-key` (Anthropic's), compared in constant time.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use tower_model_fallback::ConfigError;

use crate::config::ClientConfig;

/// The clients allowed to call; empty means anonymous (loopback, or `allow_anonymous`).
#[derive(Clone, Default)]
pub struct Clients {
    keys: Arc<[ClientKey]>,
}

/// A client's name and key.
type ClientKey = (Arc<str>, Box<[u8]>);

/// No configured key matched the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthorized;

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a key is never printed.
        f.debug_list()
            .entries(self.keys.iter().map(|(name, _)| name))
            .finish()
    }
}

/// Who called: a client's name, or `None` when the gateway is anonymous.
pub type Caller = Option<Arc<str>>;

impl Clients {
    /// Reads every client's key from `env`; a missing or empty one is an error naming the field.
    pub fn from_config(
        clients: &[ClientConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Clients, ConfigError> {
        let mut keys = Vec::with_capacity(clients.len());
        for (i, client) in clients.iter().enumerate() {
            let key = env(&client.key_env)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("clients[{i}].key_env"),
                        format!("environment variable {} is not set", client.key_env),
                    )
                })?;
            keys.push((
                Arc::from(client.name.as_str()),
                key.into_bytes().into_boxed_slice(),
            ));
        }
        Ok(Clients { keys: keys.into() })
    }

    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The caller, when its key is one of the clients'; the header that carried the key is
    /// removed, so it can never travel upstream. `Err` when a key is required and none matched.
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Result<Caller, Unauthorized> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| strip_bearer(v.as_bytes()));
        let found = bearer.and_then(|key| self.find(key)).map(|n| (n, true));
        let found = found.or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|key| self.find(key.as_bytes()))
                .map(|n| (n, false))
        });
        let (name, from_authorization) = found.ok_or(Unauthorized)?;
        if from_authorization {
            headers.remove(AUTHORIZATION);
        } else {
            headers.remove("x-api-key");
        }
        Ok(Some(name))
    }

    /// The client whose key is `presented`. Every key is compared, each in constant time.
    fn find(&self, presented: &[u8]) -> Option<Arc<str>> {
        let mut found = None;
        for (name, key) in self.keys.iter() {
            if constant_time_eq(presented, key) {
                found = Some(name.clone());
            }
        }
        found
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let prefix = value.get(..7)?;
    prefix
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
}

/// Equal lengths and equal bytes, without an early exit on the first difference. The length of
/// a key is not secret (they are long random strings); its bytes are.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Clients {
        let config = [
            ClientConfig {
                name: "web".into(),
                key_env: "WEB".into(),
            },
            ClientConfig {
                name: "batch".into(),
                key_env: "BATCH".into(),
            },
        ];
        Clients::from_config(&config, |v| Some(format!("key-of-{v}"))).unwrap()
    }

    #[test]
    fn a_key_in_either_header_names_its_client_and_is_removed() {
        let c = clients();
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer key-of-BATCH".parse().unwrap());
        assert_eq!(c.authenticate(&mut h).unwrap().as_deref(), Some("batch"));
        assert!(h.get(AUTHORIZATION).is_none());
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "key-of-WEB".parse().unwrap());
        assert_eq!(c.authenticate(&mut h).unwrap().as_deref(), Some("web"));
        assert!(h.get("x-api-key").is_none());
    }

    #[test]
    fn wrong_short_long_or_missing_keys_are_refused() {
        let c = clients();
        for value in [
            "Bearer key-of-WEX",
            "Bearer key-of-WE",
            "Bearer key-of-WEBB",
            "key-of-WEB",
            "Bearer ",
            "Basic a2V5LW9mLVdFQg==",
        ] {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, value.parse().unwrap());
            assert!(c.authenticate(&mut h).is_err(), "{value}");
        }
        assert!(c.authenticate(&mut HeaderMap::new()).is_err());
        assert_eq!(
            Clients::default().authenticate(&mut HeaderMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn a_missing_key_names_the_field_and_debug_shows_no_key() {
        let config = [ClientConfig {
            name: "web".into(),
            key_env: "WEB_CLIENT_KEY".into(),
        }];
        let err = Clients::from_config(&config, |_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "clients[0].key_env: environment variable WEB_CLIENT_KEY is not set"
        );
        let debug = format!("{:?}", clients());
        assert!(!debug.contains("key-of"), "{debug}");
    }
}
