//! driftless: a webhook-first GitOps reconciler for Kubernetes.
//!
//! A push webhook (or the drift timer, or `driftless sync`) becomes a [`queue::Job`]; a worker
//! fetches the app's subtree from the forge, turns it into Kubernetes objects and applies them
//! with server-side apply. See `README.md` and `docs/architecture.md` for the whole picture.

pub mod cli;
pub mod drift;
pub mod forge;
pub mod manifest;
pub mod metrics;
pub mod preview;
pub mod queue;
pub mod reconcile;
pub mod render;
pub mod server;
pub mod settings;
#[cfg(feature = "test-support")]
pub mod simulator;
pub mod status_pages;
#[cfg(feature = "test-support")]
pub mod story;
pub mod telemetry;
pub mod webhook;
pub mod worker;
