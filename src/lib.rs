//! # Sigil
//!
//! A node-local SPIFFE workload identity daemon for AI agents. It attests
//! the processes that connect to its Unix socket from the kernel's facts,
//! matches them to registration entries, and serves them short-lived
//! X.509-SVIDs over the standard SPIFFE Workload API, rotating them as they
//! age and dropping them when the process exits.
//!
//! # Layout
//! Data flows one way:
//! (`workload_api`, `admin_api`) → `identity` → (`attest`, `policy`, `ca`, `store`).
//!
//! - [`config`]: the TOML file and the embedded defaults, validated.
//! - [`attest`]: peer credentials and /proc → selectors and an instance id
//!   (cached per process while what can change without an exec is
//!   unchanged); which program opened a connection and who holds it
//!   (shared /proc walks).
//! - [`policy`]: registration entries, matching, SPIFFE ID templates.
//! - [`ca`]: the CA key and certificate, the X.509-SVID profile, minting.
//! - [`identity`]: per-instance SVIDs, tasks, rotation, re-attestation,
//!   exit, revocation and the CRL publisher; a registry does create-or-join
//!   and one actor per instance publishes its state whole on a `watch`.
//! - [`store`]: SQLite: instances, tasks, SVIDs, revocations, stored
//!   entries, the hash-chained audit log;
//!   one writer thread group-commits every write.
//! - [`workload_api`]: the gRPC server on the socket (thin adapters for the
//!   Workload API and the task extension, and the `:authority` repair).
//! - [`admin_api`]: the operators' gRPC server on its own socket: who may
//!   call (peer credentials), instances, tasks, revocation, entries, the
//!   audit trail and status, over `identity` and `store`.
//! - [`verify`]: the verdict on a presented X.509-SVID (chain, CRL,
//!   lifetime, trust domain) and the SPIFFE ID patterns services allow.
//! - [`gate`]: `sigil gate`, the mTLS reverse proxy that enforces agent
//!   identity, rules (down to MCP tools) and revocation before a service.
//! - [`metrics`]: Prometheus metrics (one registry per process, typed
//!   labels) and the `/metrics`, `/livez`, `/readyz` listener.
//! - [`sys`]: the one module with `unsafe` (kcmp(2), signal(2) for the
//!   clients' SIGPIPE, jemalloc's options).
//! - [`app`]: the single wiring point and the bounded runtime;
//!   [`shutdown`]: stop and drain.
//! - [`fsutil`]: directories only root or the daemon's user can change,
//!   private (0700/0600) directories and files, and binding the socket only
//!   where nothing else lies.
//! - [`connect`]: clients reaching the daemon's sockets, and what a failed
//!   connect means for a person.
//! - [`cli`]: the `sigil` command line.

// `unsafe` is denied here and allowed only in `sys`, one documented system
// call that no safe crate wraps.
#![deny(unsafe_code)]

pub mod admin_api;
pub mod app;
pub mod attest;
pub mod ca;
pub mod cli;
pub mod config;
pub mod connect;
pub mod fsutil;
pub mod gate;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod shutdown;
pub mod store;
pub mod sys;
pub mod telemetry;
pub mod verify;
pub mod workload_api;
