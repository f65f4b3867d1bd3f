//! Finding a request's API key and checking what it may do.
//!
//! Segment SDKs send the write key as the HTTP Basic user name with an empty
//! password; other clients may send `Authorization: Bearer <key>`. Both are
//! accepted on every route; the Segment routes also take `writeKey` in the
//! body.

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;

use super::error::ApiError;
use crate::keys::{ApiKeys, Scope};

/// What a route needs its key to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A write key: sending events.
    Write,
    /// A read or an admin key: reading.
    Read,
    /// An admin key: changing or deleting.
    Admin,
}

impl Need {
    fn allows(self, scope: Scope) -> bool {
        matches!(
            (self, scope),
            (Need::Write, Scope::Write)
                | (Need::Read, Scope::Read | Scope::Admin)
                | (Need::Admin, Scope::Admin)
        )
    }

    fn doing(self) -> &'static str {
        match self {
            Need::Write => "send events; use a write key",
            Need::Read => "read; use a read or admin key",
            Need::Admin => "change or delete; use an admin key",
        }
    }
}

/// Why a request's key was refused: the same on every route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key in `Authorization` (nor `writeKey` where a body may carry
    /// one).
    #[error(
        "an API key is required: send it as the HTTP Basic user name (empty password) or as `Authorization: Bearer <key>` (a Segment call may also carry `writeKey` in its body)"
    )]
    MissingKey,
    /// A key Traitline does not know, or an unreadable header.
    #[error("the API key is not known")]
    UnknownKey,
    /// A known key that may not do what the route does.
    #[error("this key may not {}", needs.doing())]
    WrongScope { needs: Need },
}

impl ApiError for AuthError {
    fn status(&self) -> StatusCode {
        match self {
            AuthError::MissingKey | AuthError::UnknownKey => StatusCode::UNAUTHORIZED,
            AuthError::WrongScope { .. } => StatusCode::FORBIDDEN,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AuthError::MissingKey => "missing_key",
            AuthError::UnknownKey => "unknown_key",
            AuthError::WrongScope { .. } => "wrong_key_scope",
        }
    }
}

/// Checks that `key` may do what `needs` says.
pub fn authorize(keys: &ApiKeys, key: Option<&str>, needs: Need) -> Result<(), AuthError> {
    let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::MissingKey)?;
    match keys.scope(key) {
        Some(scope) if needs.allows(scope) => Ok(()),
        Some(_) => Err(AuthError::WrongScope { needs }),
        None => Err(AuthError::UnknownKey),
    }
}

/// The key in the `Authorization` header, if there is one. A header that is
/// present but unreadable is an unknown key, not a missing one.
pub fn key_from_headers(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| AuthError::UnknownKey)?.trim();
    let (scheme, credentials) = value.split_once(' ').ok_or(AuthError::UnknownKey)?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(credentials.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .map_err(|_| AuthError::UnknownKey)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::UnknownKey)?;
        // `user:password`; the key is the user name, the password is empty.
        let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
        if user.is_empty() {
            return Ok(None);
        }
        return Ok(Some(user.to_owned()));
    }
    Err(AuthError::UnknownKey)
}

/// Checks the key a request carries (its headers) for `needs`.
pub fn authorize_request(
    keys: &ApiKeys,
    headers: &axum::http::HeaderMap,
    needs: Need,
) -> Result<(), AuthError> {
    let key = key_from_headers(headers)?;
    authorize(keys, key.as_deref(), needs)
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
        let keys = ApiKeys::new(&["w".into()], &["r".into()], &["a".into()]);
        let check = |key: Option<&str>, needs| authorize(&keys, key, needs);
        assert_eq!(check(Some("w"), Need::Write), Ok(()));
        assert_eq!(check(Some("r"), Need::Read), Ok(()));
        assert_eq!(check(Some("a"), Need::Read), Ok(()));
        assert_eq!(check(Some("a"), Need::Admin), Ok(()));
        for (key, needs) in [
            ("r", Need::Write),
            ("a", Need::Write),
            ("w", Need::Read),
            ("r", Need::Admin),
        ] {
            assert_eq!(
                check(Some(key), needs),
                Err(AuthError::WrongScope { needs }),
                "{key} for {needs:?}"
            );
        }
        assert_eq!(check(Some("x"), Need::Read), Err(AuthError::UnknownKey));
        assert_eq!(check(None, Need::Write), Err(AuthError::MissingKey));
        assert_eq!(check(Some(""), Need::Write), Err(AuthError::MissingKey));
    }
}
