//! Destination definitions, in the shape DESIGN.md fixes:
//!
//! ```json
//! {"kind": "webhook", "source": "user_events", "where": "event == \"order.create\"",
//!  "url": "https://crm.example.com/hooks/traitline", "secret": "whsec_...",
//!  "ordering": "per-user"}
//! {"kind": "s3", "source": "user_events", "endpoint": "http://127.0.0.1:9000",
//!  "bucket": "events", "prefix": "raw", "region": "us-east-1",
//!  "access_key_id": "...", "secret_access_key": "..."}
//! ```
//!
//! Secrets are write-only: [`DestinationDefinition::redacted`] is what the
//! API shows, and no error message repeats a secret's value.

use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{Condition, DefinitionError, ENVELOPE_FIELDS, check_name, parse_duration};

/// A destination as written: JSON through the admin API, or a
/// `[[destinations]]` table of `traitline.toml` (which also carries the
/// `name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationDefinition {
    /// In the file only; the API takes the name from the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `webhook`, or `s3`: the archive.
    #[schema(pattern = "^(webhook|s3)$")]
    pub kind: String,
    /// The topic it delivers, by short name: `user_events`,
    /// `user_profile_changes`, `user_metrics` or `user_alerts`.
    pub source: String,
    /// A CEL condition over the source's records; only those it matches
    /// are delivered.
    #[serde(rename = "where", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Where a webhook POSTs (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Standard Webhooks signing secret(s), `whsec_` and base64: a list
    /// while a secret is rotated (every one signs). Write-only; a `PUT`
    /// without it keeps the current ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secrets>,
    /// `unordered` (the default) or `per-user`: a user's next record waits
    /// for the previous one's delivery; other users go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(unordered|per-user)$")]
    pub ordering: Option<String>,
    /// Most deliveries in flight at once (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub max_in_flight: Option<usize>,
    /// Records sent in one request, as `{"batch": [...]}` (default 1:
    /// each record alone, as the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub batch_size: Option<usize>,
    /// How long an endpoint has to answer an attempt (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// How long a record is retried before it is a dead letter (default
    /// `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_for: Option<String>,
    /// The first retry's delay (default `1s`); each next one doubles,
    /// with jitter, up to `backoff_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// The longest delay between two attempts (default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<String>,
    /// The archive's S3-compatible server (http or https); without it,
    /// Amazon S3 (or `AWS_ENDPOINT_URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The archive's bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Where in the bucket its objects go (`raw`: `raw/dt=.../hh=.../`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The bucket's region (default `AWS_REGION`, else `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// With `secret_access_key`; without both, the standard AWS variables
    /// (`AWS_ACCESS_KEY_ID`, ...) and instance credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Write-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// An archive object goes once it holds this many bytes of JSON lines
    /// (before gzip; default 64 MiB, from 1 KiB to 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 1073741824)]
    pub roll_bytes: Option<usize>,
    /// ... or once its first record is this old (default `1m`, at most
    /// `1h`); an object never spans two hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roll_after: Option<String>,
}

/// One signing secret, or several during a rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Secrets {
    One(String),
    Many(Vec<String>),
}

impl Secrets {
    fn all(&self) -> Vec<&str> {
        match self {
            Secrets::One(s) => vec![s.as_str()],
            Secrets::Many(list) => list.iter().map(String::as_str).collect(),
        }
    }
}

/// What the API shows of a secret.
const HIDDEN: &str = "whsec_********";

/// The topics a destination may read, by short name, with the fields
/// their records have at the top (what a filter may name).
pub const SOURCES: &[(&str, &[&str])] = &[
    ("user_events", ENVELOPE_FIELDS),
    (
        "user_profile_changes",
        &[
            "change_id",
            "profile_id",
            "user_id",
            "before",
            "after",
            "causes",
            "changed_at",
        ],
    ),
    (
        "user_metrics",
        &[
            "metric", "version", "group", "start", "end", "value", "events", "final",
        ],
    ),
    (
        "user_alerts",
        &[
            "id",
            "rule",
            "version",
            "key",
            "message_ids",
            "first",
            "last",
            "at",
            "steps",
        ],
    ),
];

/// Whether a user's records wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Unordered,
    PerUser,
}

/// A checked, compiled destination.
#[derive(Debug, Clone)]
pub struct DestinationSpec {
    pub name: String,
    /// The source topic's short name (`user_events`).
    pub source: &'static str,
    pub filter: Option<Condition>,
    pub ordering: Ordering,
    pub max_in_flight: usize,
    /// Records a request carries at most (1: each alone).
    pub batch_size: usize,
    pub target: Target,
}

/// Where a destination delivers.
#[derive(Debug, Clone)]
pub enum Target {
    Webhook(WebhookSpec),
    Archive(ArchiveSpec),
}

/// Where and how the archive writes its objects.
#[derive(Debug, Clone)]
pub struct ArchiveSpec {
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Without a trailing `/`; empty: objects start at `dt=`.
    pub prefix: String,
    pub region: Option<String>,
    /// Access key id and secret, when set here.
    pub credentials: Option<(String, String)>,
    pub roll_bytes: usize,
    pub roll_after: Duration,
    pub backoff: Duration,
    pub backoff_max: Duration,
}

/// Where and how a webhook delivers.
#[derive(Debug, Clone)]
pub struct WebhookSpec {
    pub url: reqwest::Url,
    /// Decoded signing keys; empty: deliveries are not signed.
    pub secrets: Vec<Vec<u8>>,
    pub timeout: Duration,
    pub retry_for: Duration,
    pub backoff: Duration,
    pub backoff_max: Duration,
}

/// Longest a single attempt may be given.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

impl DestinationDefinition {
    pub fn from_json(body: &[u8]) -> Result<DestinationDefinition, DefinitionError> {
        super::from_json(body)
    }

    /// The definition as the API shows it: secrets hidden.
    pub fn redacted(&self) -> DestinationDefinition {
        let mut shown = self.clone();
        shown.secret = self.secret.as_ref().map(|s| match s {
            Secrets::One(_) => Secrets::One(HIDDEN.to_owned()),
            Secrets::Many(list) => Secrets::Many(vec![HIDDEN.to_owned(); list.len()]),
        });
        if shown.secret_access_key.is_some() {
            shown.secret_access_key = Some("********".to_owned());
        }
        shown
    }

    /// Checks every field and compiles it as `name`.
    pub fn compile(&self, name: &str) -> Result<DestinationSpec, DefinitionError> {
        check_name("name", name)?;
        let archive = match self.kind.as_str() {
            "webhook" => false,
            "s3" => true,
            other => {
                return Err(DefinitionError::new(
                    "kind",
                    format!("`{other}` is not a destination kind (webhook or s3)"),
                ));
            }
        };
        let archive_only = [
            ("endpoint", self.endpoint.is_some()),
            ("bucket", self.bucket.is_some()),
            ("prefix", self.prefix.is_some()),
            ("region", self.region.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("roll_bytes", self.roll_bytes.is_some()),
            ("roll_after", self.roll_after.is_some()),
        ];
        let webhook_only = [
            ("url", self.url.is_some()),
            ("secret", self.secret.is_some()),
            ("ordering", self.ordering.is_some()),
            ("max_in_flight", self.max_in_flight.is_some()),
            ("batch_size", self.batch_size.is_some()),
            ("timeout", self.timeout.is_some()),
            ("retry_for", self.retry_for.is_some()),
        ];
        let (foreign, what) = if archive {
            (
                &webhook_only[..],
                "a webhook's, not the archive's (`kind: \"s3\"`)",
            )
        } else {
            (
                &archive_only[..],
                "the archive's (`kind: \"s3\"`), not a webhook's",
            )
        };
        if let Some((field, _)) = foreign.iter().find(|(_, set)| *set) {
            return Err(DefinitionError::new(
                *field,
                format!("is a setting of {what}"),
            ));
        }
        let Some(&(source, roots)) = SOURCES.iter().find(|(s, _)| *s == self.source) else {
            return Err(DefinitionError::new(
                "source",
                format!(
                    "`{}` is not a topic a destination reads (one of {})",
                    self.source,
                    SOURCES
                        .iter()
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let filter = self
            .condition
            .as_deref()
            .map(|c| Condition::compile_over("where", c, roots))
            .transpose()?;
        let ordering = match self.ordering.as_deref() {
            None | Some("unordered") => Ordering::Unordered,
            Some("per-user") => Ordering::PerUser,
            Some(other) => {
                return Err(DefinitionError::new(
                    "ordering",
                    format!("`{other}` is not an ordering (unordered or per-user)"),
                ));
            }
        };
        let max_in_flight = self.max_in_flight.unwrap_or(100);
        if !(1..=10_000).contains(&max_in_flight) {
            return Err(DefinitionError::new(
                "max_in_flight",
                "must be from 1 to 10000",
            ));
        }
        let batch_size = self.batch_size.unwrap_or(1);
        if !(1..=1000).contains(&batch_size) {
            return Err(DefinitionError::new("batch_size", "must be from 1 to 1000"));
        }
        let duration = |field: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => {
                parse_duration(text).map_err(|reason| DefinitionError::new(field, reason))
            }
        };
        let backoff = duration("backoff", &self.backoff, Duration::from_secs(1))?;
        if backoff.is_zero() {
            return Err(DefinitionError::new("backoff", "must be above 0"));
        }
        let backoff_max = duration("backoff_max", &self.backoff_max, Duration::from_secs(3600))?;
        if backoff_max < backoff {
            return Err(DefinitionError::new(
                "backoff_max",
                "must be at least `backoff`",
            ));
        }
        let target = if archive {
            let roll_after = duration("roll_after", &self.roll_after, Duration::from_secs(60))?;
            if roll_after.is_zero() || roll_after > Duration::from_secs(3600) {
                return Err(DefinitionError::new(
                    "roll_after",
                    "must be above 0 and at most 1h",
                ));
            }
            Target::Archive(self.archive(roll_after, backoff, backoff_max)?)
        } else {
            Target::Webhook(self.webhook(duration, backoff, backoff_max)?)
        };
        Ok(DestinationSpec {
            name: name.to_owned(),
            source,
            filter,
            ordering,
            max_in_flight,
            batch_size,
            target,
        })
    }

    fn webhook(
        &self,
        duration: impl Fn(&str, &Option<String>, Duration) -> Result<Duration, DefinitionError>,
        backoff: Duration,
        backoff_max: Duration,
    ) -> Result<WebhookSpec, DefinitionError> {
        let url = self.url()?;
        let secrets = match &self.secret {
            None => Vec::new(),
            Some(secrets) => {
                let all = secrets.all();
                if all.is_empty() {
                    return Err(DefinitionError::new(
                        "secret",
                        "an empty list: give one secret, or several while rotating",
                    ));
                }
                all.into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let field = match secrets {
                            Secrets::One(_) => "secret".to_owned(),
                            Secrets::Many(_) => format!("secret[{i}]"),
                        };
                        decode_secret(&field, s)
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let timeout = duration("timeout", &self.timeout, Duration::from_secs(10))?;
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(DefinitionError::new(
                "timeout",
                "must be above 0 and at most 5m",
            ));
        }
        let retry_for = duration("retry_for", &self.retry_for, Duration::from_secs(24 * 3600))?;
        Ok(WebhookSpec {
            url,
            secrets,
            timeout,
            retry_for,
            backoff,
            backoff_max,
        })
    }

    fn archive(
        &self,
        roll_after: Duration,
        backoff: Duration,
        backoff_max: Duration,
    ) -> Result<ArchiveSpec, DefinitionError> {
        let Some(bucket) = self.bucket.clone() else {
            return Err(DefinitionError::new(
                "bucket",
                "the archive needs a `bucket`",
            ));
        };
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !valid_bucket {
            return Err(DefinitionError::new(
                "bucket",
                "not a bucket name: 3 to 63 lowercase letters, digits, `.` and `-`, starting and ending with a letter or digit",
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            let url = reqwest::Url::parse(endpoint)
                .map_err(|e| DefinitionError::new("endpoint", format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(DefinitionError::new(
                    "endpoint",
                    "must be an http or https URL with a host",
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(DefinitionError::new(
                    "endpoint",
                    "carries credentials; use `access_key_id` and `secret_access_key`",
                ));
            }
        }
        let prefix = self.prefix.as_deref().unwrap_or("").trim_matches('/');
        if prefix.split('/').any(|part| matches!(part, "." | ".."))
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Err(DefinitionError::new(
                "prefix",
                "must be a path of names without `.`, `..` or empty parts",
            ));
        }
        let credentials = match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(DefinitionError::new(
                    "secret_access_key",
                    "is needed with `access_key_id`",
                ));
            }
            (None, Some(_)) => {
                return Err(DefinitionError::new(
                    "access_key_id",
                    "is needed with `secret_access_key`",
                ));
            }
        };
        let roll_bytes = self.roll_bytes.unwrap_or(64 << 20);
        if !(1024..=1 << 30).contains(&roll_bytes) {
            return Err(DefinitionError::new(
                "roll_bytes",
                "must be from 1024 to 1073741824",
            ));
        }
        Ok(ArchiveSpec {
            endpoint: self.endpoint.clone(),
            bucket,
            prefix: prefix.to_owned(),
            region: self.region.clone(),
            credentials,
            roll_bytes,
            roll_after,
            backoff,
            backoff_max,
        })
    }

    fn url(&self) -> Result<reqwest::Url, DefinitionError> {
        let Some(text) = self.url.as_deref() else {
            return Err(DefinitionError::new("url", "a webhook needs a `url`"));
        };
        let url = reqwest::Url::parse(text)
            .map_err(|e| DefinitionError::new("url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DefinitionError::new(
                "url",
                format!("`{}` is not http or https", url.scheme()),
            ));
        }
        if url.host().is_none() {
            return Err(DefinitionError::new("url", "has no host"));
        }
        // Credentials in a URL end up in logs and in the API's answers.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DefinitionError::new(
                "url",
                "carries credentials; sign with `secret` instead",
            ));
        }
        Ok(url)
    }
}

/// A Standard Webhooks secret: `whsec_` and the base64 of the key.
fn decode_secret(field: &str, secret: &str) -> Result<Vec<u8>, DefinitionError> {
    let refused = || {
        DefinitionError::new(
            field,
            "not a Standard Webhooks secret: `whsec_` followed by the base64 of 24 to 64 random bytes",
        )
    };
    let encoded = secret.strip_prefix("whsec_").ok_or_else(refused)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| refused())?;
    if !(24..=64).contains(&key.len()) {
        return Err(refused());
    }
    Ok(key)
}

impl super::Definition for DestinationDefinition {
    type Spec = DestinationSpec;
    const NOUN: &'static str = "destination";
    const TABLE: &'static str = "destinations";

    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn unnamed(&self) -> Self {
        DestinationDefinition {
            name: None,
            ..self.clone()
        }
    }

    fn compile(&self, name: &str) -> Result<DestinationSpec, DefinitionError> {
        DestinationDefinition::compile(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn compile(body: &str) -> Result<DestinationSpec, DefinitionError> {
        DestinationDefinition::from_json(body.as_bytes())?.compile("crm")
    }

    fn refused(body: &str) -> (String, String) {
        let e = compile(body).unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn a_webhook_compiles_with_its_defaults() {
        let spec = compile(&format!(
            r#"{{"kind": "webhook", "source": "user_events", "where": "event == \"order.create\"",
                "url": "https://crm.example.com/hooks", "secret": "{SECRET}", "ordering": "per-user"}}"#
        ))
        .unwrap();
        assert_eq!(spec.source, "user_events");
        assert_eq!(spec.ordering, Ordering::PerUser);
        assert_eq!(spec.max_in_flight, 100);
        let Target::Webhook(webhook) = &spec.target else {
            panic!("a webhook")
        };
        assert_eq!(webhook.secrets.len(), 1);
        assert_eq!(webhook.secrets[0].len(), 24);
        assert_eq!(webhook.retry_for, Duration::from_secs(86_400));
        let filter = spec.filter.unwrap();
        assert!(filter.matches(&serde_json::json!({"event": "order.create"})));
        assert!(!filter.matches(&serde_json::json!({"event": "page"})));
    }

    #[test]
    fn a_filter_reads_the_fields_of_its_source() {
        let alerts = compile(
            r#"{"kind": "webhook", "source": "user_alerts", "where": "rule == \"card_testing\"",
                "url": "http://example.com/"}"#,
        )
        .unwrap();
        assert!(
            alerts
                .filter
                .unwrap()
                .matches(&serde_json::json!({"rule": "card_testing"}))
        );
        let (field, reason) = refused(
            r#"{"kind": "webhook", "source": "user_alerts", "where": "event == \"x\"",
                "url": "http://example.com/"}"#,
        );
        assert_eq!(field, "where");
        assert!(reason.contains("`event`"), "{reason}");
    }

    #[test]
    fn bad_fields_are_named_and_secrets_are_not_repeated() {
        let base = r#""kind": "webhook", "source": "user_events", "url": "http://example.com/""#;
        for (extra, field) in [
            (r#""secret": "whsec_notbase64!!""#, "secret"),
            (r#""secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw""#, "secret"),
            (
                r#""secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2hvcnQ="]"#,
                "secret[1]",
            ),
            (r#""ordering": "by-user""#, "ordering"),
            (r#""max_in_flight": 0"#, "max_in_flight"),
            (r#""batch_size": 1001"#, "batch_size"),
            (r#""timeout": "10m""#, "timeout"),
            (r#""retry_for": "soon""#, "retry_for"),
            (r#""backoff": "1h", "backoff_max": "1m""#, "backoff_max"),
            (r#""bucket": "events""#, "bucket"),
            (r#""where": "propertes.amount > 1""#, "where"),
        ] {
            let (got, reason) = refused(&format!("{{{base}, {extra}}}"));
            assert_eq!(got, field, "{extra}: {reason}");
            assert!(
                !reason.contains("c2hvcnQ") && !reason.contains("notbase64"),
                "{reason}"
            );
        }
        for (body, field) in [
            (r#"{"kind": "kafka", "source": "user_events"}"#, "kind"),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "b"}"#,
                "bucket",
            ),
            (r#"{"kind": "s3", "source": "user_events"}"#, "bucket"),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "url": "http://e.com/"}"#,
                "url",
            ),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "endpoint": "s3.local"}"#,
                "endpoint",
            ),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "prefix": "raw/../x"}"#,
                "prefix",
            ),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "access_key_id": "k"}"#,
                "secret_access_key",
            ),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "roll_bytes": 10}"#,
                "roll_bytes",
            ),
            (
                r#"{"kind": "s3", "source": "user_events", "bucket": "events", "roll_after": "2h"}"#,
                "roll_after",
            ),
            (
                r#"{"kind": "webhook", "source": "user_profiles", "url": "http://e.com/"}"#,
                "source",
            ),
            (r#"{"kind": "webhook", "source": "user_events"}"#, "url"),
            (
                r#"{"kind": "webhook", "source": "user_events", "url": "ftp://e.com/"}"#,
                "url",
            ),
            (
                r#"{"kind": "webhook", "source": "user_events", "url": "http://u:p@e.com/"}"#,
                "url",
            ),
            (
                r#"{"kind": "webhook", "source": "user_events", "url": "http://e.com/", "colour": 1}"#,
                "colour",
            ),
        ] {
            let (got, reason) = refused(body);
            assert_eq!(got, field, "{body}: {reason}");
        }
    }

    #[test]
    fn an_archive_compiles_with_its_defaults() {
        let spec = compile(
            r#"{"kind": "s3", "source": "user_events", "endpoint": "http://127.0.0.1:9000",
                "bucket": "events", "prefix": "/raw/", "region": "us-east-1",
                "access_key_id": "AKIA", "secret_access_key": "s3cret"}"#,
        )
        .unwrap();
        let Target::Archive(archive) = spec.target else {
            panic!("an archive")
        };
        assert_eq!(archive.bucket, "events");
        assert_eq!(archive.prefix, "raw");
        assert_eq!(archive.roll_bytes, 64 << 20);
        assert_eq!(archive.roll_after, Duration::from_secs(60));
        assert_eq!(
            archive.credentials,
            Some(("AKIA".to_owned(), "s3cret".to_owned()))
        );
    }

    #[test]
    fn the_api_shows_no_secret() {
        let definition = DestinationDefinition::from_json(
            format!(
                r#"{{"kind": "webhook", "source": "user_events", "url": "http://e.com/",
                    "secret": ["{SECRET}", "{SECRET}"]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let shown = serde_json::to_string(&definition.redacted()).unwrap();
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
        assert!(
            shown.contains(r#""secret":["whsec_********","whsec_********"]"#),
            "{shown}"
        );
    }
}
