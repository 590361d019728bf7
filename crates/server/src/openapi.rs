//! The OpenAPI document of the JSON API, served at `/api/v1/openapi.json`. A test checks
//! that every `/api/` route of the router is described here and nothing more.

pub const DOCUMENT: &str = include_str!("../openapi.json");
