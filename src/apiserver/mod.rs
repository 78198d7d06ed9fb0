//! The embedded Kubernetes API server.

pub mod openapi;
pub mod patch;
pub mod schema;
pub mod table;
