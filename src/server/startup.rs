//! What the server says about itself at start: one info line each for its version, the
//! address it listens on (and whether it speaks TLS), the history store, auth, the origin rule
//! and the trusted proxies. Also the build's name for `/metrics`' `chatterbox_build_info`.

use std::net::SocketAddr;

use crate::config::Config;

/// The cargo features this binary was built with, comma-separated (may be empty).
pub fn features() -> String {
    let all: &[(&str, bool)] = &[("sqlite", cfg!(feature = "sqlite"))];
    let on: Vec<&str> = all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    on.join(",")
}

/// The start-up lines, in order; `local` is the bound address.
pub fn lines(cfg: &Config, local: SocketAddr) -> Vec<String> {
    let version = env!("CARGO_PKG_VERSION");
    let features = match features() {
        f if f.is_empty() => "none".to_string(),
        f => f,
    };
    let store = if cfg.db_path == ":memory:" {
        format!(
            "store: memory ({} messages per room, lost at exit)",
            cfg.memory_history_per_room
        )
    } else {
        // Where it lands: a relative path is relative to the working directory.
        let mut shown = String::new();
        if !cfg.db_path.starts_with('/') {
            if let Ok(dir) = std::env::current_dir() {
                shown = format!("{}/", dir.display());
            }
        }
        format!("store: SQLite file {shown}{}", cfg.db_path)
    };
    let auth = if cfg.jwt_secret.is_empty() {
        "auth: off (anyone may connect and read the REST API)".to_string()
    } else {
        let mut s = String::from("auth: JWT (HS256)");
        if !cfg.jwt_audience.is_empty() {
            s.push_str(&format!(", audience '{}'", cfg.jwt_audience));
        }
        if !cfg.jwt_issuer.is_empty() {
            s.push_str(&format!(", issuer '{}'", cfg.jwt_issuer));
        }
        if cfg.metrics_public {
            s.push_str(", /metrics public");
        }
        s
    };
    let origins = cfg.allowed_origins.trim();
    let origin = match origins {
        "" => "origin rule: same host only (a browser's Origin must name the Host it asked for)"
            .to_string(),
        "*" => "origin rule: any origin (*)".to_string(),
        list => format!("origin rule: only {list}"),
    };
    let proxies = if cfg.trusted_proxies.is_empty() {
        "trusted proxies: none (X-Forwarded-For and Forwarded are ignored)".to_string()
    } else {
        format!("trusted proxies: {}", cfg.trusted_proxies)
    };
    vec![
        format!("chatterbox {version} (features: {features})"),
        format!("chatterbox listening on {local} (plain)"),
        store,
        auth,
        origin,
        proxies,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingValue;
    use crate::proxy::TrustedProxies;

    #[test]
    fn one_line_each_names_what_is_in_force() {
        let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let l = lines(
            &Config {
                db_path: ":memory:".into(),
                ..Config::default()
            },
            addr,
        );
        assert_eq!(l.len(), 6);
        assert!(l[0].starts_with(&format!(
            "chatterbox {} (features: ",
            env!("CARGO_PKG_VERSION")
        )));
        assert_eq!(l[1], "chatterbox listening on 127.0.0.1:9000 (plain)");
        assert!(l[2].starts_with("store: memory"), "{}", l[2]);
        assert!(l[3].starts_with("auth: off"));
        assert!(l[4].starts_with("origin rule: same host only"));
        assert!(l[5].starts_with("trusted proxies: none"));
        let cfg = Config {
            db_path: "/var/lib/chatterbox/chat.db".into(),
            jwt_secret: "k".into(),
            jwt_audience: "chat".into(),
            allowed_origins: "https://a.example".into(),
            trusted_proxies: TrustedProxies::parse_setting("10.0.0.0/8,::1").unwrap(),
            ..Config::default()
        };
        let l = lines(&cfg, addr);
        assert_eq!(l[2], "store: SQLite file /var/lib/chatterbox/chat.db");
        assert_eq!(l[3], "auth: JWT (HS256), audience 'chat'");
        assert_eq!(l[4], "origin rule: only https://a.example");
        assert_eq!(l[5], "trusted proxies: 10.0.0.0/8,::1/128");
        let star = Config {
            allowed_origins: " * ".into(),
            ..Config::default()
        };
        assert_eq!(lines(&star, addr)[4], "origin rule: any origin (*)");
        // A relative path is shown where it lands.
        let l = lines(&Config::default(), addr);
        assert!(
            l[2].ends_with("/chatterbox.db") && l[2].contains("store: SQLite file /"),
            "{}",
            l[2]
        );
    }
}
