//! chatterbox: a WebSocket chat room server on one single-threaded `mio` event loop.
//!
//! # Layout
//!
//! - [`auth`] — optional HS256 JWT checks for `/ws` and the REST API, and the token's
//!   permissions ([`auth::Permissions`]: `rooms`, `publish`, `admin`) the core checks.
//!   [`auth_keys`] — RS256 / ES256 tokens checked with `--jwt-public-key` (feature `tls`,
//!   with `ring`).
//! - [`config`] — every setting and limit: flag, environment variable, default, `--help`.
//! - [`logging`] — the logger (text or JSON lines with UTC dates) and [`log_safe`], the
//!   escaping every client-chosen value gets in a log line.
//! - [`proxy`] — `--trusted-proxies` and what a request through one says of its client
//!   (`X-Forwarded-For`, `Forwarded`, `X-Forwarded-Host`): pure parsing, no sockets; cargo
//!   feature `deploy` (default), without which no proxy is trusted.
//! - [`chat`] — the sans-IO core. [`chat::Chat`] owns members, rooms and the rules of SPEC §2–§5;
//!   the transport feeds it inputs with the time and it answers through an [`chat::Outbox`].
//!   Member ids come from a source given to [`chat::Chat::new`] (the server: UUID v4; tests:
//!   [`chat::counted_ids`]). Inside it:
//!   - `chat/commands/<name>.rs` — one file per command: its fields, a `Deserialize` struct,
//!     next to its `apply`; `chat/commands/mod.rs` lists them ([`chat::protocol::Command`],
//!     its names derived from that list) and dispatches with one `match`.
//!   - [`chat::protocol`] — `decode` (frame → command or error code), the events, the codes.
//!   - `chat/rooms.rs` — `Rooms`: room → members and member → rooms, changed together, with
//!     the room caps; `chat/dedup.rs` — `Dedup`: the `msg_id` window and its cap.
//!   - [`chat::validate`] — names and texts; `chat/ratelimit.rs` — the token bucket;
//!     [`chat::Close`] — every reason the server closes a connection, with its code and text.
//!   - `chat/pending.rs` — the core's side of the engine boundary: requests awaited by token,
//!     joiners' live events held until their page, broadcasts held until their id is reserved.
//! - [`store`] — room history behind the asynchronous [`store::engine::Engine`] boundary
//!   (requests in, replies out as inputs to the core; [`store::engine`] is its one
//!   description): the memory engine, or SQLite with group commit on a writer thread and reads
//!   on a reader thread (cargo feature `sqlite`, on by default). [`store::HistoryStore`] is the
//!   synchronous store the memory engine and test doubles are built from.
//! - [`server`] — the transport: the `mio` loop, the `Slab` of connections, HTTP heads with
//!   `httparse`, the WebSocket handshake and framing with `tungstenite`, bounded write buffers,
//!   timers and signals. Inside it, one file per concern:
//!   - `server/mod.rs` — the loop itself: poll, dispatch, the turn, frames into the core.
//!   - `server/accept.rs` — accept, the head, the router; `server/admission.rs` — the pure
//!     decisions: `at_accept` (socket and per-address caps) and `admit`, whether a `/ws`
//!     request becomes a member (handshake headers, origin, token, cap, name).
//!   - `server/conn.rs` — one connection and its life as a state machine (`Life`: open, close
//!     queued, closing, write side shut); `server/closing.rs` — the one place a
//!     [`chat::Close`] (each close's code and reason) becomes a close frame.
//!   - `server/report.rs` — what the operator sees of refusals (`admission::Refusal`) and
//!     closes ([`chat::Close`]): one log line each with address and reason, floods summed
//!     up per address and reason, counts by reason for `/metrics`.
//!   - `server/timers.rs` — the per-connection `TimerTable` and `timer_due`, the one place
//!     each timer is acted on; `server/output.rs` — the output bound, reply credit and kept
//!     buffers.
//!   - `server/server_api.rs` — the server API (cargo feature `server-api`, on by default):
//!     the writes with `X-API-Key`, each one input of the core (`chat/api.rs`: a server
//!     publish, direct, room create/delete, message removal, disconnect); the admin commands
//!     `delete` and `kick` do the same from a member whose token says `admin`.
//!   - `server/stream.rs` — the byte stream under a connection: plain TCP or, with the `tls`
//!     feature, rustls over it (`server/tls.rs`: certificate loading, `SIGHUP` reload, the
//!     sans-IO `ServerConnection` driven from the loop); the output bound counts its records.
//!   - [`server::api`] answers the REST endpoints from the core's views; [`server::wire`] is
//!     the WebSocket read path without a socket (read budget, fragment cap, output bound),
//!     which the `connection` fuzz target drives.
//!
//! - [`supervise`] — `--workers N`: the supervisor that runs N copies of the binary on one
//!   port (`--reuse-port`), restarts one that dies and forwards the stop signals; its
//!   decisions in the sans-IO [`supervise::Plan`].
//!
//! The binary (`src/main.rs`) only reads the settings, sets up logging and calls
//! [`server::Server::run`] (or, with `--workers` above 1, [`supervise::run`]).

pub mod auth;
pub mod auth_keys;
pub mod chat;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod logging;
pub mod proxy;
pub mod server;
pub mod store;
pub mod supervise;

pub use logging::log_safe;
