//! The OpenAPI 3 document of every route, served at `GET /openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::envelope::{EventEnvelope, EventType, Source};
use crate::ingest::error::{ErrorBody, ErrorDetail};
use crate::ingest::segment::{BatchRequest, SegmentMessage};
use crate::ingest::{Accepted, seed::SeedEvent};
use crate::profile::ProfileView;
use crate::query::{ChangeList, Deleted, EventList, ProfileList};
use crate::server::{Health, Processing, Readiness};
use crate::store::ChangeRecord;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Traitline",
        description = "User-activity events in over HTTP (the Segment Tracking API and the seed route), durable in an event log. Every key is accepted as the HTTP Basic user name with an empty password, or as `Authorization: Bearer <key>`."
    ),
    paths(
        crate::ingest::seed_track,
        crate::ingest::track,
        crate::ingest::identify,
        crate::ingest::page,
        crate::ingest::screen,
        crate::ingest::group,
        crate::ingest::alias,
        crate::ingest::batch,
        crate::query::get_profile,
        crate::query::list_profiles,
        crate::query::profile_changes,
        crate::query::profile_events,
        crate::query::delete_profile,
        crate::server::healthz,
        crate::server::readyz,
    ),
    components(schemas(
        SeedEvent, SegmentMessage, BatchRequest, Accepted, ErrorBody, ErrorDetail,
        EventEnvelope, EventType, Source, Health, Readiness, Processing,
        ProfileView, ProfileList, ChangeList, ChangeRecord, EventList, Deleted
    )),
    modifiers(&Security),
    tags(
        (name = "segment", description = "The Segment HTTP Tracking API"),
        (name = "seed", description = "The original trait service route"),
        (name = "profiles", description = "Profiles built from the events: read with a read or admin key, delete with an admin key"),
        (name = "operations", description = "Health and readiness"),
    )
)]
pub struct ApiDoc;

/// Declares the two ways to send a key.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
