//! One attempt to deliver to a webhook: a JSON POST with the Standard
//! Webhooks headers, judged by its answer. Retries, their timing and
//! what becomes of a record are the processor's ([`super::processor`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use super::address::{Resolver, check_host};
use super::signature::sign;
use crate::definitions::destination::WebhookSpec;

/// How much of an endpoint's answer an attempt keeps.
const EXCERPT: usize = 256;

/// What an attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The HTTP status, when the endpoint answered.
    pub status: Option<u16>,
    pub latency: Duration,
    /// The start of the answer's body, or why there was none.
    pub response: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A 2xx within the timeout.
    Delivered,
    /// Anything else: try again, no sooner than `after` when the endpoint
    /// said so (`Retry-After`).
    Retry { after: Option<Duration> },
    /// 410 Gone: the endpoint is no more; the destination is disabled.
    Gone,
}

/// Sends webhook requests: one per destination, so one endpoint's
/// connections are its own.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
}

impl Sender {
    pub fn new(allow_private: bool) -> Result<Sender, String> {
        crate::install_tls();
        let client = reqwest::Client::builder()
            .dns_resolver(Resolver { allow_private })
            // A redirect could lead anywhere, a private address included.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("Traitline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the webhook client: {e}"))?;
        Ok(Sender {
            client,
            allow_private,
        })
    }

    /// POSTs `body` (JSON) as message `id`.
    pub async fn attempt(&self, spec: &WebhookSpec, id: &str, body: &Bytes) -> Attempt {
        let started = Instant::now();
        let failed = |response: String| Attempt {
            status: None,
            latency: started.elapsed(),
            response,
            verdict: Verdict::Retry { after: None },
        };
        if let Err(refused) = check_host(&spec.url, self.allow_private) {
            return failed(refused);
        }
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(spec.url.clone())
            .timeout(spec.timeout)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string());
        if !spec.secrets.is_empty() {
            request = request.header(
                "webhook-signature",
                sign(&spec.secrets, id, timestamp, body),
            );
        }
        let response = match request.body(body.clone()).send().await {
            Ok(response) => response,
            Err(e) => return failed(describe(&e, spec.timeout)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = match tokio::time::timeout(
            spec.timeout.saturating_sub(started.elapsed()),
            response.bytes(),
        )
        .await
        {
            Ok(Ok(bytes)) => excerpt(&bytes),
            Ok(Err(e)) => format!("the answer's body could not be read: {e}"),
            Err(_) => "the answer's body did not arrive within the timeout".to_owned(),
        };
        let verdict = if status.is_success() {
            Verdict::Delivered
        } else if status == reqwest::StatusCode::GONE {
            Verdict::Gone
        } else {
            Verdict::Retry { after: retry_after }
        };
        let response = match (status.is_redirection(), location) {
            (true, Some(to)) => format!("a redirect to {to}, which is not followed"),
            _ => text,
        };
        Attempt {
            status: Some(status.as_u16()),
            latency: started.elapsed(),
            response,
            verdict,
        }
    }
}

/// Why a request got no answer, in a sentence.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    // The resolver's refusal is the innermost cause: say it.
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    if e.is_connect() {
        format!("cannot connect: {cause}")
    } else {
        format!("the request failed: {cause}")
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT)]);
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        let wait = retry_after(&later).unwrap();
        assert!(
            wait > Duration::from_secs(80) && wait <= Duration::from_secs(90),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Mon, 01 Jan 2001 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }
}
