//! The gateway's config file: where to listen, who may call, the client-side timeouts, and a
//! [`FallbackConfig`] for everything about targets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tower_model_fallback::{ConfigError, FallbackConfig};

/// A parsed config. Keys (the targets' and the clients') are still environment variable names:
/// [`Gateway::new`](crate::Gateway::new) reads them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Where to listen (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The clients allowed to call, each with the environment variable that holds its key.
    pub clients: Vec<ClientConfig>,
    /// Serve without `clients` on an address that is not loopback.
    pub allow_anonymous: bool,
    /// How long a request head may take to arrive, counted from when the connection waits for
    /// it (default 10 s).
    pub header_read_timeout: Duration,
    /// The longest pause while a request body is read (default 10 s).
    pub body_read_timeout: Duration,
    /// How long a connection with no request in flight may stay silent (default 5 s).
    pub idle_timeout: Duration,
    /// After SIGTERM, how long requests in flight may take before they are cut (default 30 s).
    pub shutdown_timeout: Duration,
    /// Speak HTTP/2 with prior knowledge (h2c) to `http://` targets (default `false`).
    pub upstream_h2c: bool,
    /// How log lines are written: `"json"` (one object a line) or `"text"`; unset, text when
    /// stderr is a terminal and JSON otherwise.
    pub log_format: Option<LogFormat>,
    /// Where traces go over OTLP/HTTP, when set (`otel`; needs the `otel` feature). Read at
    /// start only: a reload that changes it waits for a restart.
    pub otel: Option<OtelConfig>,
    /// Targets, limits, policy. Cooldowns are on unless the file says `"cooldown": "off"`.
    pub fallback: FallbackConfig,
}

/// The `otel` section: an OTLP/HTTP (protobuf) collector for the gateway's traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    /// Where spans are POSTed: the `endpoint` URL, with `/v1/traces` when it has no path.
    pub endpoint: http::Uri,
    /// The `service.name` resource attribute (default `fallback-gateway`).
    pub service_name: String,
    /// Headers for the collector, each with the environment variable that holds its value
    /// (`headers_env`, e.g. an API key).
    pub headers_env: BTreeMap<String, String>,
    /// How long one export may take (`timeout_ms`, default 10 s).
    pub timeout: Duration,
}

impl OtelConfig {
    /// The collector's headers, their values from `env`, marked sensitive. A variable that is
    /// not set is an error naming it.
    pub fn headers(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConfigError> {
        self.headers_env
            .iter()
            .map(|(name, var)| {
                let field = || format!("otel.headers_env.{name}");
                // Names were checked when the file was parsed.
                let header = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| ConfigError::new(field(), "is not a valid header name"))?;
                let value = env(var).ok_or_else(|| {
                    ConfigError::new(field(), format!("environment variable {var} is not set"))
                })?;
                let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
                    ConfigError::new(
                        field(),
                        format!("environment variable {var} is not a valid header value"),
                    )
                })?;
                value.set_sensitive(true);
                Ok((header, value))
            })
            .collect()
    }

    /// Parses the section; errors name the field (`otel.endpoint`, …).
    fn from_value(value: Value) -> Result<OtelConfig, ConfigError> {
        let Value::Object(mut object) = value else {
            return Err(ConfigError::new(
                "otel",
                format!("expected an object, got {value}"),
            ));
        };
        let within = |e: ConfigError| e.within("otel");
        let endpoint: String = take(&mut object, "endpoint")
            .map_err(within)?
            .ok_or_else(|| ConfigError::new("otel.endpoint", "is required"))?;
        let endpoint =
            traces_endpoint(&endpoint).map_err(|e| ConfigError::new("otel.endpoint", e))?;
        let service_name: String = take(&mut object, "service_name")
            .map_err(within)?
            .unwrap_or_else(|| OTEL_SERVICE_NAME.to_owned());
        if service_name.is_empty() {
            return Err(ConfigError::new("otel.service_name", "must not be empty"));
        }
        let headers_env: BTreeMap<String, String> = take(&mut object, "headers_env")
            .map_err(within)?
            .unwrap_or_default();
        let mut seen = Vec::new();
        for (name, var) in &headers_env {
            let field = || format!("otel.headers_env.{name}");
            // Lowercased: `X-Key` and `x-key` are one header.
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                return Err(ConfigError::new(field(), "is not a valid header name"));
            };
            if EXPORTER_HEADERS.contains(&header.as_str()) {
                return Err(ConfigError::new(
                    field(),
                    "is set by the exporter or the connection, not by the config",
                ));
            }
            if seen.contains(&header) {
                return Err(ConfigError::new(
                    field(),
                    "is given twice (header names are not case-sensitive)",
                ));
            }
            seen.push(header);
            if var.is_empty() {
                return Err(ConfigError::new(field(), "names no environment variable"));
            }
        }
        let timeout_ms: u64 = take(&mut object, "timeout_ms")
            .map_err(within)?
            .unwrap_or(OTEL_TIMEOUT_MS);
        if !(1..=OTEL_TIMEOUT_MAX_MS).contains(&timeout_ms) {
            // Bounded: SIGTERM waits up to twice this for the last spans.
            return Err(ConfigError::new(
                "otel.timeout_ms",
                format!("must be from 1 to {OTEL_TIMEOUT_MAX_MS}"),
            ));
        }
        if let Some(unknown) = object.keys().next() {
            return Err(ConfigError::new(
                format!("otel.{unknown}"),
                format!(
                    "unknown field `{unknown}`, expected one of `endpoint`, `service_name`, \
                     `headers_env`, `timeout_ms`"
                ),
            ));
        }
        Ok(OtelConfig {
            endpoint,
            service_name,
            headers_env,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

/// `endpoint` as the URL spans are POSTed to: `http` or `https`, a host, no credentials (they
/// belong in `headers_env`, never in a URL a log could show), and OTLP/HTTP's `/v1/traces`
/// when the URL has no path of its own.
fn traces_endpoint(endpoint: &str) -> Result<http::Uri, String> {
    if endpoint.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("is not a URL like http://127.0.0.1:4318: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must be an http:// or https:// URL".to_owned());
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err("holds credentials; give them as headers in headers_env".to_owned());
    }
    // The exporter logs the URL of a failed export (at debug): a token in a query would show.
    if uri.query().is_some() {
        return Err("has a query; give credentials as headers in headers_env".to_owned());
    }
    if authority.host().is_empty() {
        return Err("has no host".to_owned());
    }
    match uri.path_and_query() {
        Some(pq) if pq.path() != "/" => Ok(uri),
        _ => {
            let mut parts = uri.into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(OTEL_TRACES_PATH));
            http::Uri::from_parts(parts).map_err(|e| format!("{e}"))
        }
    }
}

/// OTLP/HTTP's path for traces, appended to an endpoint without a path.
const OTEL_TRACES_PATH: &str = "/v1/traces";
const OTEL_SERVICE_NAME: &str = "fallback-gateway";
const OTEL_TIMEOUT_MS: u64 = 10_000;
const OTEL_TIMEOUT_MAX_MS: u64 = 60_000;
/// Headers the exporter (`content-type`, `content-length`, `content-encoding`) or the
/// connection sets: one from `headers_env` would break the export.
const EXPORTER_HEADERS: [&str; 8] = [
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "te",
    "upgrade",
];

/// The `log_format` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The format asked for, or text on a terminal and JSON otherwise.
    pub fn or_by_terminal(format: Option<LogFormat>) -> LogFormat {
        format.unwrap_or_else(|| {
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                LogFormat::Text
            } else {
                LogFormat::Json
            }
        })
    }
}

/// One entry of `clients`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's name, in the logs.
    pub name: String,
    /// The environment variable that holds the client's key.
    pub key_env: String,
}

/// The gateway fields and their defaults in milliseconds.
const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
const BODY_READ_TIMEOUT_MS: u64 = 10_000;
const IDLE_TIMEOUT_MS: u64 = 5_000;
const SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// A committed stream whose upstream is silent this long is cut (`null` in the file: never).
const STREAM_IDLE_TIMEOUT_MS: u64 = 120_000;

impl GatewayConfig {
    /// Parses `{"listen": …, "clients": […], …, ...FallbackConfig fields}`. Unknown fields are
    /// errors, and every error names its field.
    pub fn from_json(json: &[u8]) -> Result<GatewayConfig, ConfigError> {
        let value: Value = serde_json::from_slice(json)
            .map_err(|e| ConfigError::new("config", format!("not valid JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(ConfigError::new("config", "expected a JSON object"));
        };
        let listen = match object.remove("listen") {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(Value::String(s)) => s.parse().map_err(|e| {
                ConfigError::new(
                    "listen",
                    format!("{s:?} is not an address like 127.0.0.1:8080: {e}"),
                )
            })?,
            Some(other) => {
                return Err(ConfigError::new(
                    "listen",
                    format!("expected a string, got {other}"),
                ))
            }
        };
        let clients: Vec<ClientConfig> = take(&mut object, "clients")?.unwrap_or_default();
        for (i, client) in clients.iter().enumerate() {
            if client.name.is_empty() {
                return Err(ConfigError::new(
                    format!("clients[{i}].name"),
                    "must not be empty",
                ));
            }
        }
        let ms = |object: &mut Map<String, Value>, field: &'static str, default: u64| {
            let ms: u64 = take(object, field)?.unwrap_or(default);
            if ms == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
            Ok(Duration::from_millis(ms))
        };
        let header_read_timeout = ms(
            &mut object,
            "header_read_timeout_ms",
            HEADER_READ_TIMEOUT_MS,
        )?;
        let body_read_timeout = ms(&mut object, "body_read_timeout_ms", BODY_READ_TIMEOUT_MS)?;
        let idle_timeout = ms(&mut object, "idle_timeout_ms", IDLE_TIMEOUT_MS)?;
        let shutdown_timeout = ms(&mut object, "shutdown_timeout_ms", SHUTDOWN_TIMEOUT_MS)?;
        let allow_anonymous = take(&mut object, "allow_anonymous")?.unwrap_or(false);
        let upstream_h2c = take(&mut object, "upstream_h2c")?.unwrap_or(false);
        // A stalled upstream must not hold a client's stream open for ever.
        object
            .entry("stream_idle_timeout_ms")
            .or_insert(Value::from(STREAM_IDLE_TIMEOUT_MS));
        let log_format = take(&mut object, "log_format")?;
        let otel = match object.remove("otel") {
            None => None,
            // Never ignored: a file that asks for traces gets them or a clear refusal.
            Some(_) if !cfg!(feature = "otel") => {
                return Err(ConfigError::new(
                    "otel",
                    "this fallback-gateway was built without OpenTelemetry; build it with \
                     `--features otel` (Docker: --build-arg FEATURES=otel) or remove the section",
                ))
            }
            Some(value) => Some(OtelConfig::from_value(value)?),
        };
        // Cooldowns protect upstreams: on unless turned off, with the library's settings form.
        match object.get("cooldown") {
            None => {
                object.insert("cooldown".into(), Value::Object(Map::new()));
            }
            Some(Value::String(s)) if s == "off" => {
                object.remove("cooldown");
            }
            Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(ConfigError::new(
                    "cooldown",
                    format!("expected an object or \"off\", got {other}"),
                ))
            }
        }
        Ok(GatewayConfig {
            listen,
            clients,
            allow_anonymous,
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            shutdown_timeout,
            upstream_h2c,
            log_format,
            otel,
            // Deserialized from the parsed value: errors name the field, not a position in a
            // re-encoded document.
            fallback: FallbackConfig::from_value(Value::Object(object))?,
        })
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &str) -> Result<GatewayConfig, ConfigError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ConfigError::new("config", format!("cannot read {path}: {e}")))?;
        GatewayConfig::from_json(&bytes)
    }

    /// The listen rule: without clients, only a loopback address, unless `allow_anonymous`.
    pub(crate) fn check_listen(&self) -> Result<(), ConfigError> {
        if self.clients.is_empty() && !self.allow_anonymous && !self.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "clients",
                format!(
                    "are required to listen on {}, which is not a loopback address \
                     (or set \"allow_anonymous\": true)",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// Removes `field` from `object` and deserializes it; an error names the field.
fn take<T: serde::de::DeserializeOwned>(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<T>, ConfigError> {
    match object.remove(field) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ConfigError::new(field, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldowns_are_on_unless_turned_off() {
        let target = r#""targets": [{"base_url": "http://127.0.0.1:9/v1"}]"#;
        let on = GatewayConfig::from_json(format!("{{{target}}}").as_bytes()).unwrap();
        assert!(on.fallback.cooldown.is_some());
        let off =
            GatewayConfig::from_json(format!(r#"{{{target}, "cooldown": "off"}}"#).as_bytes())
                .unwrap();
        assert!(off.fallback.cooldown.is_none());
        let tuned = GatewayConfig::from_json(
            format!(r#"{{{target}, "cooldown": {{"failures": 7}}}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(tuned.fallback.cooldown.map(|c| c.failures), Some(7));
        let err = GatewayConfig::from_json(format!(r#"{{{target}, "cooldown": 5}}"#).as_bytes())
            .unwrap_err();
        assert!(err.to_string().starts_with("cooldown: expected an object"));
    }

    #[test]
    fn a_group_is_accepted_as_a_target_and_its_errors_name_the_member() {
        let json = |members: &str| {
            format!(
                r#"{{"targets": [{{"base_url": "http://127.0.0.1:9/v1"}}, {{"group": "openai", "members": [{members}]}}]}}"#
            )
        };
        let ok = GatewayConfig::from_json(
            json(r#"{"base_url": "http://127.0.0.1:9/v1"}, {"base_url": "http://127.0.0.1:10/v1", "weight": 2}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.fallback.targets.len(), 2);
        let err = GatewayConfig::from_json(
            json(r#"{"base_url": "http://127.0.0.1:9/v1", "modle": "m"}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("targets[1].members[0].modle: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn timeouts_have_defaults_of_seconds_and_refuse_zero() {
        let target = r#""targets": [{"base_url": "http://127.0.0.1:9/v1"}]"#;
        let c = GatewayConfig::from_json(format!("{{{target}}}").as_bytes()).unwrap();
        assert_eq!(
            (
                c.header_read_timeout,
                c.body_read_timeout,
                c.idle_timeout,
                c.shutdown_timeout
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(10),
                Duration::from_secs(5),
                Duration::from_secs(30)
            )
        );
        let err =
            GatewayConfig::from_json(format!(r#"{{{target}, "idle_timeout_ms": 0}}"#).as_bytes())
                .unwrap_err();
        assert_eq!(err.to_string(), "idle_timeout_ms: must be at least 1");
        let err = GatewayConfig::from_json(
            format!(r#"{{{target}, "shutdown_timeout_ms": "soon"}}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("shutdown_timeout_ms: invalid type"));
        assert_eq!(c.fallback.stream_idle_timeout_ms, Some(120_000));
        assert!(c.fallback.stream_error_events);
        let off = GatewayConfig::from_json(
            format!(r#"{{{target}, "stream_idle_timeout_ms": null}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(off.fallback.stream_idle_timeout_ms, None);
    }

    #[test]
    fn the_otel_endpoint_gets_the_traces_path_when_it_has_none() {
        for (given, used) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            (
                "https://otel.example/custom/traces",
                "https://otel.example/custom/traces",
            ),
        ] {
            assert_eq!(traces_endpoint(given).unwrap().to_string(), used);
        }
        for (given, problem) in [
            ("", "must not be empty"),
            ("127.0.0.1:4318", "must be an http:// or https:// URL"),
            ("/v1/traces", "must be an http:// or https:// URL"),
            (
                "http://u:secret@otel.example",
                "holds credentials; give them as headers in headers_env",
            ),
            (
                "https://otel.example/v1/traces?api_key=secret",
                "has a query; give credentials as headers in headers_env",
            ),
            (
                "https://otel.example?tenant=a",
                "has a query; give credentials as headers in headers_env",
            ),
        ] {
            assert_eq!(traces_endpoint(given).unwrap_err(), problem, "{given}");
        }
    }

    #[cfg(feature = "otel")]
    #[test]
    fn the_otel_section_has_defaults_and_reads_its_headers_from_the_environment() {
        let json = r#"{"targets": [{"base_url": "http://127.0.0.1:9/v1"}],
            "otel": {"endpoint": "http://127.0.0.1:4318", "headers_env": {"x-api-key": "K"}}}"#;
        let otel = GatewayConfig::from_json(json.as_bytes())
            .unwrap()
            .otel
            .unwrap();
        assert_eq!(otel.service_name, "fallback-gateway");
        assert_eq!(otel.timeout, Duration::from_secs(10));
        let headers = otel
            .headers(|v| (v == "K").then(|| "v".to_owned()))
            .unwrap();
        assert_eq!(headers.len(), 1);
        assert!(headers[0].1.is_sensitive());
        let err = otel.headers(|_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "otel.headers_env.x-api-key: environment variable K is not set"
        );
    }

    #[test]
    fn log_format_is_json_or_text() {
        let target = r#""targets": [{"base_url": "http://127.0.0.1:9/v1"}]"#;
        let parse =
            |extra: &str| GatewayConfig::from_json(format!("{{{target}{extra}}}").as_bytes());
        assert_eq!(parse("").unwrap().log_format, None);
        let json = parse(r#", "log_format": "json""#).unwrap();
        assert_eq!(json.log_format, Some(LogFormat::Json));
        let text = parse(r#", "log_format": "text""#).unwrap();
        assert_eq!(text.log_format, Some(LogFormat::Text));
        let err = parse(r#", "log_format": "xml""#).unwrap_err();
        assert!(
            err.to_string().starts_with("log_format: unknown variant"),
            "{err}"
        );
    }
}
