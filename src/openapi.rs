//! The OpenAPI 3 document of every route, served at `GET /openapi.json`.

use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::envelope::{EventEnvelope, EventType, Source};
use crate::http::{ErrorBody, ErrorDetail};
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
        crate::admin::put_metric,
        crate::admin::get_metric,
        crate::admin::list_metrics,
        crate::admin::delete_metric,
        crate::admin::metric_values,
        crate::admin::rules::put_rule,
        crate::admin::rules::get_rule,
        crate::admin::rules::list_rules,
        crate::admin::rules::delete_rule,
        crate::admin::rules::list_alerts,
        crate::admin::rules::profile_alerts,
        crate::admin::destinations::put_destination,
        crate::admin::destinations::get_destination,
        crate::admin::destinations::list_destinations,
        crate::admin::destinations::delete_destination,
        crate::admin::destinations::list_attempts,
        crate::admin::destinations::list_failures,
        crate::admin::destinations::replay,
        crate::admin::destinations::list_replays,
        crate::home::home,
        crate::server::healthz,
        crate::server::readyz,
        crate::metrics::render,
    ),
    components(schemas(
        SeedEvent, SegmentMessage, BatchRequest, Accepted, ErrorBody, ErrorDetail,
        EventEnvelope, EventType, Source, Health, Readiness, Processing,
        ProfileView, ProfileList, ChangeList, ChangeRecord, EventList, Deleted,
        crate::home::Home, crate::home::Link, crate::supervisor::StageState,
        crate::process::metrics::DefinitionState,
        crate::admin::MetricEntry, crate::admin::MetricList, crate::admin::Progress,
        crate::admin::WindowValues, crate::admin::WindowValue,
        crate::admin::RuleEntry, crate::admin::RuleList, crate::admin::AlertList,
        crate::definitions::RuleDefinition, crate::definitions::rule::StepDefinition,
        crate::definitions::rule::Times,
        crate::definitions::MetricDefinition, crate::definitions::metric::WindowDefinition,
        crate::admin::destinations::DestinationEntry, crate::admin::destinations::DestinationList,
        crate::admin::destinations::DestinationStatus, crate::admin::destinations::ArchiveStatus, crate::admin::destinations::AttemptList,
        crate::admin::destinations::FailureList, crate::admin::destinations::ReplayRequest,
        crate::admin::destinations::ReplayView, crate::admin::destinations::ReplayList,
        crate::definitions::DestinationDefinition, crate::definitions::destination::Secrets
    )),
    modifiers(&Security),
    tags(
        (name = "segment", description = "The Segment HTTP Tracking API"),
        (name = "seed", description = "The original trait service route"),
        (name = "profiles", description = "Profiles built from the events: read with a read or admin key, delete with an admin key"),
        (name = "metrics", description = "Metric definitions: define, change and delete with an admin key, read with a read or admin key"),
        (name = "rules", description = "Pattern rules and their alerts: define, change and delete rules with an admin key; read rules and alerts with a read or admin key"),
        (name = "destinations", description = "Destinations (webhooks): define, change and delete with an admin key (secrets are write-only); read them, their attempts and dead letters with a read or admin key"),
        (name = "operations", description = "Health, readiness and metrics"),
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

/// The Segment call types, their route, and the fields each requires
/// beyond `userId` or `anonymousId` (alias: instead of them).
const CALLS: [(&str, &str, &[&str]); 6] = [
    ("track", "TrackCall", &["event"]),
    ("identify", "IdentifyCall", &[]),
    ("page", "PageCall", &[]),
    ("screen", "ScreenCall", &[]),
    ("group", "GroupCall", &["groupId"]),
    ("alias", "AliasCall", &["userId", "previousId"]),
];

/// The fields that hold an id.
const IDS: [&str; 5] = [
    "userId",
    "anonymousId",
    "messageId",
    "groupId",
    "previousId",
];

/// The document as served: utoipa's, plus what its derive cannot say. Each
/// Segment route's body names the fields that call requires (present, not
/// null, not empty), and a batch message is one of those calls by its
/// `type`, so a schema-driven tester generates only requests the service
/// accepts as valid.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document is JSON");
    let schemas = &mut doc["components"]["schemas"];
    // Ids may be numbers (kept as text), as Segment's API accepts.
    for id in IDS {
        schemas["SegmentMessage"]["properties"][id]["type"] = json!(["string", "number", "null"]);
    }
    // A single route ignores `type` (the route says it); a batch message's
    // `type` is one of the calls (below).
    schemas["SegmentMessage"]["properties"]["type"] = json!({
        "type": ["string", "null"],
        "description": "The call type: required inside a batch (track, identify, page, screen, group or alias), ignored on the single routes.",
    });
    schemas["SeedEvent"]["properties"]["payload"]["properties"] = json!({
        "client_os": {"type": ["string", "null"]},
        "client_version": {"type": ["string", "null"]},
    });
    let present = |field: &str| {
        let kind = if IDS.contains(&field) {
            json!(["string", "number"])
        } else {
            json!("string")
        };
        json!({"required": [field], "properties": {field: {"type": kind, "minLength": 1}}})
    };
    let mut batch_items = Vec::new();
    for (kind, name, required) in CALLS {
        let mut rules = vec![json!({"$ref": "#/components/schemas/SegmentMessage"})];
        if kind != "alias" {
            rules.push(json!({"anyOf": [present("userId"), present("anonymousId")]}));
        }
        rules.extend(required.iter().map(|field| present(field)));
        doc["components"]["schemas"][name] = json!({
            "description": format!("A `{kind}` call: the fields it requires."),
            "allOf": rules,
        });
        doc["paths"][format!("/v1/{kind}")]["post"]["requestBody"]["content"]["application/json"]
            ["schema"] = json!({"$ref": format!("#/components/schemas/{name}")});
        batch_items.push(json!({"allOf": [
            {"$ref": format!("#/components/schemas/{name}")},
            {"required": ["type"], "properties": {"type": {"const": kind}}},
        ]}));
    }
    doc["components"]["schemas"]["BatchRequest"]["properties"]["batch"] = json!({
        "type": "array",
        "minItems": 1,
        "description": "The messages; each has a `type` and the fields that call requires.",
        "items": {"oneOf": batch_items},
    });
    doc
}
