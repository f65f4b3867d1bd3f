//! The front page at `/`: what Traitline is and where its routes are, so a
//! person who opens the address in a browser (or an API client that asks
//! it for JSON) learns where to go instead of meeting an empty 404.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::Roles;

/// One route the front page points to.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Link {
    /// What it is for.
    #[schema(example = "Send one event (Segment track)")]
    pub what: &'static str,
    #[schema(example = "POST /v1/track")]
    pub route: &'static str,
}

/// What `/` answers an API client.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Home {
    #[schema(example = "Traitline")]
    pub name: &'static str,
    pub version: &'static str,
    pub about: &'static str,
    /// The routes this process serves (its roles decide which).
    pub links: Vec<Link>,
}

const ABOUT: &str = "User-activity events in over HTTP (the Segment Tracking API and the seed route), stored durably in an event log and turned into user profiles.";

impl Home {
    /// The front page of a process with `roles`.
    pub fn new(roles: &Roles) -> Home {
        let mut links = Vec::new();
        if roles.ingest {
            links.extend([
                Link {
                    what: "Send one event (Segment track; also identify, page, screen, group, alias)",
                    route: "POST /v1/track",
                },
                Link {
                    what: "Send many events at once",
                    route: "POST /v1/batch",
                },
                Link {
                    what: "Send an event with the original seed API",
                    route: "POST /event/user/track",
                },
            ]);
        }
        if roles.query {
            links.extend([
                Link {
                    what: "Read a profile (read key)",
                    route: "GET /v1/profiles/{id}",
                },
                Link {
                    what: "List profiles (read key)",
                    route: "GET /v1/profiles",
                },
            ]);
        }
        links.extend([
            Link {
                what: "Every route, its body and its answers (OpenAPI 3)",
                route: "GET /openapi.json",
            },
            Link {
                what: "Liveness",
                route: "GET /healthz",
            },
            Link {
                what: "Readiness: the log and every stage of this process",
                route: "GET /readyz",
            },
            Link {
                what: "Metrics in the Prometheus text format",
                route: "GET /metrics",
            },
        ]);
        Home {
            name: "Traitline",
            version: env!("CARGO_PKG_VERSION"),
            about: ABOUT,
            links,
        }
    }

    fn html(&self) -> String {
        let items: String = self
            .links
            .iter()
            .map(|link| {
                let (method, path) = link.route.split_once(' ').unwrap_or(("", link.route));
                let path_html = if method == "GET" && !path.contains('{') {
                    format!("<a href=\"{path}\">{path}</a>")
                } else {
                    path.to_owned()
                };
                format!(
                    "<li><code>{method} {path_html}</code> — {}</li>\n",
                    escape(link.what)
                )
            })
            .collect();
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Traitline</title>\
             <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:3rem auto;padding:0 1rem}}code{{background:#f3f3f3;padding:0 .2rem}}</style></head>\n\
             <body><h1>Traitline {}</h1>\n<p>{}</p>\n<p>Every route takes an API key as the HTTP Basic user name (empty password) or as <code>Authorization: Bearer &lt;key&gt;</code>; the keys of a new installation are in <code>traitline-data/keys.json</code>.</p>\n<ul>\n{items}</ul>\n</body></html>\n",
            self.version, ABOUT
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The front page: HTML for a browser, JSON for everyone else.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "What Traitline is and where its routes are (HTML when the client accepts text/html)", body = Home)))]
pub async fn home(State(home): State<std::sync::Arc<Home>>, headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        Html(home.html()).into_response()
    } else {
        Json(home.as_ref().clone()).into_response()
    }
}
