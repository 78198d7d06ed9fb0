//! The embedded Kubernetes API server: a faithful subset of the Kubernetes
//! API over HTTPS, persisted in redb, for one machine and for the tests.
//!
//! ```text
//!  kubectl / kube-rs ──HTTPS+bearer──► server (TLS, hyper) ─► http::dispatch
//!        ├─ discovery (/version /api /apis ...)       discovery.rs
//!        ├─ authn (tokens) ─► rbac ─► crud / patching / watch
//!        │                               │
//!        │                     store.mutate (redb, fsync) ─► broadcast ─► watches
//!        └─ controllers loop (CRD establish, namespace delete, GC) ◄─ wake
//! ```
//!
//! Module map: [`server`] start/stop; [`pki`] certificates, tokens,
//! kubeconfig; [`store`] storage and event log; [`resources`] the served
//! resource registry; [`http`] routing; [`crud`], [`watch`], [`patching`],
//! [`scale`] the verbs; [`admission`] checks before storage, with
//! [`admission_policy`] (ValidatingAdmissionPolicy); [`rbac`] with
//! [`aggregation`]; [`controllers`];
//! [`selector`] label and field selectors. [`schema`], [`patch`], [`table`]
//! and [`openapi`] are pure functions for schema validation, patches, Tables
//! and OpenAPI documents.

pub mod admission;
pub mod admission_policy;
pub mod aggregation;
pub mod bootstrap;
pub mod controllers;
pub mod convert;
pub mod crud;
pub mod delete;
pub mod discovery;
pub mod error;
pub mod http;
pub mod objmeta;
pub mod openapi;
pub mod patch;
pub mod patching;
pub mod pki;
pub mod protobuf;
pub mod rbac;
pub mod resources;
pub mod scale;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;
pub mod watch;

pub use error::ApiError;
pub use server::{ApiServerConfig, ApiServerError, ApiServerHandle, serve, start};
