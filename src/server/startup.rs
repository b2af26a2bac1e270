//! What the server says about itself at start: one info line each for its version, the
//! address it listens on (and whether it speaks TLS), the history store, auth, the origin rule
//! and the trusted proxies. Also the build's features, for `/metrics`' `chatterbox_build_info`.
//! (Logged directly, not built as strings first: that costs the smallest build kilobytes.
//! `tests/deploy_proxy.rs::startup_says_what_is_in_force_one_line_each` checks the lines.)

use std::fmt::Write as _;
use std::net::SocketAddr;

use log::info;

use crate::config::Config;

/// The cargo features this binary was built with, comma-separated (may be empty).
pub fn features() -> String {
    let all: &[(&str, bool)] = &[
        ("sqlite", cfg!(feature = "sqlite")),
        ("deploy", cfg!(feature = "deploy")),
        ("server-api", cfg!(feature = "server-api")),
        ("admin-page", cfg!(feature = "admin-page")),
        ("tls", cfg!(feature = "tls")),
        ("cluster", cfg!(feature = "cluster")),
    ];
    let mut s = String::new();
    for (name, _) in all.iter().filter(|(_, on)| *on) {
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(name);
    }
    s
}

/// Logs the start-up lines; `local` is the bound address, `tls` whether the port speaks TLS.
pub fn log(cfg: &Config, local: SocketAddr, tls: bool) {
    // One string, one log call: cheaper in the smallest build than a call per line.
    let mut s = format!(
        "chatterbox {} (features: {})\nchatterbox listening on {local} ({})\n",
        env!("CARGO_PKG_VERSION"),
        features(),
        if tls { "TLS" } else { "plain" }
    );
    let n = cfg.memory_history_per_room;
    let _ = match cfg.db_path.as_str() {
        #[cfg(feature = "cluster")]
        _ if !cfg.redis.is_empty() => writeln!(
            s,
            "store: Redis {} (cluster mode, {} messages per room)",
            crate::log_safe(&crate::config::without_password(&cfg.redis)),
            cfg.cluster_history_per_room
        ),
        ":memory:" => writeln!(s, "store: memory ({n} messages per room, lost at exit)"),
        p if p.starts_with('/') => writeln!(s, "store: SQLite file {p}"),
        p => writeln!(s, "store: SQLite file {p} (in the working directory)"),
    };
    if cfg.jwt_secret.is_empty() {
        s.push_str("auth: off (anyone may connect and read the REST API)\n");
    } else {
        let any = |v: &str| {
            if v.is_empty() {
                "any".to_string()
            } else {
                v.to_string()
            }
        };
        let metrics = if cfg.metrics_public {
            "public"
        } else {
            "needs a token"
        };
        let _ = writeln!(
            s,
            "auth: JWT (HS256), audience: {}, issuer: {}, /metrics {metrics}",
            any(&cfg.jwt_audience),
            any(&cfg.jwt_issuer),
        );
    }
    let _ = match cfg.allowed_origins.trim() {
        "" => writeln!(
            s,
            "origin rule: same host only (a browser's Origin must name the host it asked for)"
        ),
        "*" => writeln!(s, "origin rule: any origin (*)"),
        list => writeln!(s, "origin rule: only {list}"),
    };
    let _ = if cfg.trusted_proxies.is_empty() {
        writeln!(
            s,
            "trusted proxies: none (X-Forwarded-For and Forwarded are ignored)"
        )
    } else {
        writeln!(s, "trusted proxies: {}", cfg.trusted_proxies)
    };
    for line in s.lines() {
        info!("{line}");
    }
}
