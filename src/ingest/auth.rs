//! Finding the API key of a request.
//!
//! Segment SDKs send the write key as the HTTP Basic user name with an empty
//! password; other clients may send `Authorization: Bearer <key>`. Both are
//! accepted on every route; the Segment routes also take `writeKey` in the
//! body.

use axum::http::{HeaderMap, header};
use base64::Engine;

use super::error::IngestError;
use crate::keys::{ApiKeys, Scope};

/// The key in the `Authorization` header, if there is one. A header that is
/// present but unreadable is an unknown key, not a missing one.
pub fn key_from_headers(headers: &HeaderMap) -> Result<Option<String>, IngestError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| IngestError::UnknownKey)?.trim();
    let (scheme, credentials) = value.split_once(' ').ok_or(IngestError::UnknownKey)?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(credentials.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .map_err(|_| IngestError::UnknownKey)?;
        let decoded = String::from_utf8(decoded).map_err(|_| IngestError::UnknownKey)?;
        // `user:password`; the key is the user name, the password is empty.
        let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
        if user.is_empty() {
            return Ok(None);
        }
        return Ok(Some(user.to_owned()));
    }
    Err(IngestError::UnknownKey)
}

/// Checks that `key` may send events.
pub fn require_write(keys: &ApiKeys, key: Option<&str>) -> Result<(), IngestError> {
    let key = key
        .filter(|k| !k.is_empty())
        .ok_or(IngestError::MissingKey)?;
    match keys.scope(key) {
        Some(Scope::Write) => Ok(()),
        Some(_) => Err(IngestError::WrongScope),
        None => Err(IngestError::UnknownKey),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn basic_user_name_is_the_key() {
        // base64("tlw_abc:")
        let h = headers("Basic dGx3X2FiYzo=");
        assert_eq!(key_from_headers(&h).unwrap().as_deref(), Some("tlw_abc"));
    }

    #[test]
    fn bearer_token_is_the_key() {
        let h = headers("Bearer tlw_abc");
        assert_eq!(key_from_headers(&h).unwrap().as_deref(), Some("tlw_abc"));
    }

    #[test]
    fn garbage_authorization_is_refused_not_ignored() {
        assert!(key_from_headers(&headers("Basic %%%")).is_err());
        assert!(key_from_headers(&headers("Digest x")).is_err());
        assert!(key_from_headers(&HeaderMap::new()).unwrap().is_none());
    }

    #[test]
    fn scopes_are_enforced() {
        let keys = ApiKeys::new(&["w".into()], &["r".into()], &[]);
        assert!(require_write(&keys, Some("w")).is_ok());
        assert!(matches!(
            require_write(&keys, Some("r")),
            Err(IngestError::WrongScope)
        ));
        assert!(matches!(
            require_write(&keys, Some("x")),
            Err(IngestError::UnknownKey)
        ));
        assert!(matches!(
            require_write(&keys, None),
            Err(IngestError::MissingKey)
        ));
    }
}
