//! The one HTTP boundary every API shares: how a request's key is found
//! and checked ([`keys`]), the allowance of failed authentications per
//! address ([`guard`]), and the JSON error body with its one set of codes
//! ([`error`]).
//!
//! A stage's own errors (ingest's, the query API's) map onto these at its
//! edge, so the same mistake gets the same answer on every route.

pub mod error;
pub mod guard;
pub mod keys;

pub use error::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
pub use keys::{AuthError, Need, authorize, authorize_request, key_from_headers};
