//! One integration test binary (one link, shared helpers): the CLI, the webhook receiver over
//! HTTP, the parsers under arbitrary input, and the real Kubernetes test control plane.

mod acceptance;
mod cli;
mod deploy;
mod drift;
mod drift_status;
mod fleet;
mod forge;
mod health;
mod hostile_manifests;
mod incluster;
mod kubernetes;
mod kustomize;
mod lease;
mod node;
mod ordering;
mod previews;
mod prune;
mod reconcile;
mod shutdown;
mod simulator;
mod status_pages;
mod support;
mod webhook;
mod webhook_fuzz;
mod webhook_stream;
