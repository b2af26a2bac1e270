//! Optional authentication: JSON Web Tokens, checked before the upgrade and on every REST
//! request.
//!
//! `HS256` is accepted with `--jwt-secret`, `RS256` / `ES256` with `--jwt-public-key` (the
//! key's type decides which: [`crate::auth_keys`]); `none` and every other algorithm are
//! refused, so a token cannot choose how it is checked. The HS256 signature is compared in
//! constant time (`hmac`'s `verify_slice`). Claims used: `sub` (required, the member id), `name` (optional, the member
//! name), `exp` (Unix seconds; required unless `--jwt-require-exp false`; enforced at connect
//! and during the session), `nbf` (optional, not before), `aud` and `iss` (checked when the
//! settings name them), and the permissions `rooms`, `publish` (lists of [`Patterns`]) and
//! `admin` (a boolean), parsed into [`Permissions`] the chat core checks. Times are compared
//! as integers, never added to, so no value of a claim can overflow anything. Tokens are never
//! logged.
//!
//! Checking a signature and reading the claims are separate steps: [`verify`] checks an HS256
//! signature, then hands the signed payload to [`identity_from_claims`], which any other
//! signature scheme can call the same way.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::config::Config;

/// Longest token accepted, in bytes: a guard against huge inputs before any decoding.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: becomes the member id.
    pub sub: String,
    /// `name`: becomes the member name, when present (else `sub` is the name).
    pub name: Option<String>,
    /// `exp`: Unix seconds after which the session ends.
    pub exp: Option<u64>,
    /// `rooms`, `publish`, `admin`.
    pub permissions: Permissions,
}

impl Identity {
    /// The member name the token gives: `name`, else `sub`.
    pub fn member_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.sub)
    }
}

/// Room patterns: `general` (that room), `team-*` (rooms starting with `team-`), `*` (all).
/// Every room is `None`: the common case (every member without a `rooms` claim) allocates
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns(Option<Vec<String>>);

impl Patterns {
    /// Every room (`*`).
    pub fn all() -> Self {
        Patterns(None)
    }

    /// No room at all.
    pub fn none() -> Self {
        Patterns(Some(Vec::new()))
    }

    /// Checks each pattern: a room name (`[A-Za-z0-9_.-]`, at most 64) with an optional
    /// trailing `*`, or `*` alone. `Err` names the first bad one.
    #[cfg(feature = "server-api")]
    pub fn new(list: Vec<String>) -> Result<Self, String> {
        for p in &list {
            let stem = p.strip_suffix('*').unwrap_or(p);
            let ok = (p == "*" || !stem.is_empty())
                && stem.len() <= 64
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(format!(
                    "'{}' is not a room pattern (a room name, a name ending in *, or *)",
                    crate::log_safe(p)
                ));
            }
        }
        if list.iter().any(|p| p == "*") {
            return Ok(Patterns::all());
        }
        Ok(Patterns(Some(list)))
    }

    /// Comma-separated patterns (a setting); empty text is no pattern.
    #[cfg(feature = "server-api")]
    pub fn parse_list(text: &str) -> Result<Self, String> {
        let list = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Patterns::new(list)
    }

    /// Whether `room` matches one of the patterns.
    pub fn allows(&self, room: &str) -> bool {
        let Some(list) = &self.0 else {
            return true;
        };
        list.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => p == room,
        })
    }

    /// Whether there is no pattern.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_some_and(Vec::is_empty)
    }
}

/// What a member may do (from its token; everything without auth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Rooms it may join and read.
    pub rooms: Patterns,
    /// Rooms it may broadcast to.
    pub publish: Patterns,
    /// May use `delete` and `kick`, and post to read-only rooms.
    pub admin: bool,
}

impl Default for Permissions {
    /// Every room, no admin: a member without a token, or a token without these claims.
    fn default() -> Self {
        Permissions {
            rooms: Patterns::all(),
            publish: Patterns::all(),
            admin: false,
        }
    }
}

/// Why a token was refused (answered with `401`; the text never repeats the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the query or `Authorization` header.
    Missing,
    /// Not three base64url parts of JSON, or too long.
    Malformed,
    /// `alg` is not one the settings accept (`HS256` with a secret, the public key's own).
    Algorithm,
    /// The signature does not match.
    Signature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `sub` missing or not a non-empty string, or `name`/`exp`/`aud`/`iss` of the wrong type.
    Claims,
    /// `rooms` or `publish` not a list of room patterns, or `admin` not a boolean.
    Permissions,
    /// No `exp`, and the settings require one.
    NoExpiry,
    /// `aud` does not name the configured audience.
    Audience,
    /// `iss` is not the configured issuer.
    Issuer,
}

impl AuthError {
    /// A short text for the `401` body.
    pub fn text(self) -> &'static str {
        match self {
            AuthError::Missing => "a token is required",
            AuthError::Malformed => "the token is malformed",
            AuthError::Algorithm => "the token's algorithm is not accepted",
            AuthError::Signature => "the token's signature is invalid",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::Claims => "the token's claims are invalid",
            AuthError::Permissions => {
                "the token's claims are invalid (rooms and publish must be lists of room \
                 patterns, admin a boolean)"
            }
            AuthError::NoExpiry => "the token has no expiry (exp)",
            AuthError::Audience => "the token is not meant for this server (aud)",
            AuthError::Issuer => "the token's issuer (iss) is not accepted",
        }
    }
}

/// How tokens are checked: the secret and the claim rules of the settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The HS256 key.
    pub secret: &'a [u8],
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
    /// The `aud` a token must name; empty: not checked.
    pub audience: &'a str,
    /// The `iss` a token must carry; empty: not checked.
    pub issuer: &'a str,
    /// The `--jwt-public-key` file whose key checks RS256 / ES256 tokens; empty: none
    /// ([`crate::auth_keys`]).
    pub public_key: &'a str,
}

impl<'a> Policy<'a> {
    /// The policy of `cfg`; `None` when auth is off (no `--jwt-secret`).
    pub fn of(cfg: &'a Config) -> Option<Policy<'a>> {
        (!cfg.jwt_secret.is_empty() || !cfg.jwt_public_key.is_empty()).then(|| Policy {
            secret: cfg.jwt_secret.as_bytes(),
            require_exp: cfg.jwt_require_exp,
            audience: &cfg.jwt_audience,
            issuer: &cfg.jwt_issuer,
            public_key: &cfg.jwt_public_key,
        })
    }

    /// Only the signature and the times: no `exp` required, `aud`/`iss` not checked.
    pub fn lenient(secret: &'a [u8]) -> Policy<'a> {
        Policy {
            secret,
            require_exp: false,
            audience: "",
            issuer: "",
            public_key: "",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// `aud` is a string or an array of strings (RFC 7519, 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, wanted: &str) -> bool {
        match self {
            Audience::One(a) => a == wanted,
            Audience::Many(list) => list.iter().any(|a| a == wanted),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    name: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    aud: Option<Audience>,
    iss: Option<String>,
    /// Checked after the other claims (a wrong type here has its own message).
    #[cfg(feature = "server-api")]
    rooms: Option<serde_json::Value>,
    #[cfg(feature = "server-api")]
    publish: Option<serde_json::Value>,
    #[cfg(feature = "server-api")]
    admin: Option<serde_json::Value>,
}

/// Whether the JSON object `payload` has the key `key` (a build without permissions refuses
/// tokens that carry them rather than grant more). A byte search: `"key"` then `:`, spaces
/// between allowed; a key written with escapes is not seen (the token's issuer holds the
/// secret: this guards against its mistakes, not against an attacker).
#[cfg(not(feature = "server-api"))]
fn has_key(payload: &[u8], key: &str) -> bool {
    let quoted = format!("\"{key}\"");
    let q = quoted.as_bytes();
    (0..payload.len()).any(|i| {
        payload[i..].starts_with(q)
            && payload[i + q.len()..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b':')
    })
}

/// A claim that must be a list of room patterns, when present.
#[cfg(feature = "server-api")]
fn patterns_claim(v: Option<serde_json::Value>) -> Result<Option<Patterns>, AuthError> {
    let Some(v) = v else {
        return Ok(None);
    };
    let serde_json::Value::Array(items) = v else {
        return Err(AuthError::Permissions);
    };
    let list = items
        .into_iter()
        .map(|i| match i {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(AuthError::Permissions),
        })
        .collect::<Result<Vec<String>, _>>()?;
    Patterns::new(list)
        .map(Some)
        .map_err(|_| AuthError::Permissions)
}

/// Checks `token` against `policy` at `now` (Unix seconds).
pub fn verify(token: &str, policy: &Policy<'_>, now: u64) -> Result<Identity, AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| AuthError::Malformed);
    let header: Header = serde_json::from_slice(&decode(h64)?).map_err(|_| AuthError::Malformed)?;
    let signature = decode(s64)?;
    match header.alg.as_str() {
        // HS256 only with a secret (an empty HMAC key would take anyone's signature), and
        // never with the public key's bytes.
        "HS256" if !policy.secret.is_empty() => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(policy.secret).map_err(|_| AuthError::Signature)?;
            mac.update(h64.as_bytes());
            mac.update(b".");
            mac.update(c64.as_bytes());
            mac.verify_slice(&signature)
                .map_err(|_| AuthError::Signature)?;
        }
        // The key decides which of the two it takes.
        "RS256" | "ES256" if !policy.public_key.is_empty() => {
            let input = &token[..h64.len() + 1 + c64.len()];
            crate::auth_keys::verify(&header.alg, policy.public_key, input.as_bytes(), &signature)?;
        }
        _ => return Err(AuthError::Algorithm),
    }
    // Only a signed payload is parsed further.
    identity_from_claims(&decode(c64)?, policy, now)
}

/// Reads the claims of a payload whose signature has been checked (by [`verify`], or by any
/// other scheme): the times, `aud`/`iss` under `policy`, `sub`/`name`, and the permissions.
// Inlined into `verify` (its one caller in this crate): as a function of its own it cost
// ~2 KB in the smallest build.
#[inline(always)]
pub fn identity_from_claims(
    payload: &[u8],
    policy: &Policy<'_>,
    now: u64,
) -> Result<Identity, AuthError> {
    // With permissions (`Value` claims): read as text, through the parser instantiations the
    // commands have; without, as bytes, as before (each is the smaller in its build).
    #[cfg(feature = "server-api")]
    let claims: Claims = {
        let payload = std::str::from_utf8(payload).map_err(|_| AuthError::Claims)?;
        serde_json::from_str(payload).map_err(|_| AuthError::Claims)?
    };
    #[cfg(not(feature = "server-api"))]
    let claims: Claims = serde_json::from_slice(payload).map_err(|_| AuthError::Claims)?;
    match claims.exp {
        Some(exp) if now >= exp => return Err(AuthError::Expired),
        None if policy.require_exp => return Err(AuthError::NoExpiry),
        _ => {}
    }
    if claims.nbf.is_some_and(|nbf| now < nbf) {
        return Err(AuthError::NotYetValid);
    }
    if !policy.audience.is_empty() && !claims.aud.is_some_and(|a| a.names(policy.audience)) {
        return Err(AuthError::Audience);
    }
    if !policy.issuer.is_empty() && claims.iss.as_deref() != Some(policy.issuer) {
        return Err(AuthError::Issuer);
    }
    let sub = match claims.sub {
        Some(sub) if !sub.is_empty() && sub.len() <= 128 => sub,
        _ => return Err(AuthError::Claims),
    };
    #[cfg(feature = "server-api")]
    let permissions = {
        let rooms = patterns_claim(claims.rooms)?.unwrap_or_else(Patterns::all);
        let publish = patterns_claim(claims.publish)?.unwrap_or_else(|| rooms.clone());
        let admin = match claims.admin {
            None => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => return Err(AuthError::Permissions),
        };
        Permissions {
            rooms,
            publish,
            admin,
        }
    };
    #[cfg(not(feature = "server-api"))]
    let permissions = {
        if ["rooms", "publish", "admin"]
            .iter()
            .any(|k| has_key(payload, k))
        {
            return Err(AuthError::Permissions);
        }
        Permissions::default()
    };
    Ok(Identity {
        sub,
        name: claims.name,
        exp: claims.exp,
        permissions,
    })
}

/// When a session whose token expires at `exp` (Unix seconds) must end, on the monotonic
/// clock: `mono_now` plus what is left of the token at `unix_now`. `None` when that lies
/// beyond what the clock can represent (`exp` near 2^63 and the like): such a session simply
/// never expires while the process runs. Never panics, whatever `exp` says.
pub fn session_deadline(exp: u64, unix_now: u64, mono_now: Instant) -> Option<Instant> {
    mono_now.checked_add(Duration::from_secs(exp.saturating_sub(unix_now)))
}

/// Makes an HS256 token for `claims` (JSON). For tests and tools; the server only verifies.
pub fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
    let h64 = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let c64 = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{h64}.{c64}").as_bytes());
    let s64 = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h64}.{c64}.{s64}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &[u8] = b"s3cret";
    /// Signature and times only, as before `exp` could be required: the older tests mint
    /// tokens without it on purpose.
    const LAX: Policy<'static> = Policy {
        secret: KEY,
        require_exp: false,
        audience: "",
        issuer: "",
        public_key: "",
    };

    fn forge(header: &str, claims: &str, sig: &str) -> String {
        format!(
            "{}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn a_valid_token_gives_its_identity() {
        let t = sign(&json!({"sub":"u-1","name":"alice","exp":2000}), KEY);
        let id = verify(&t, &LAX, 1000).unwrap();
        assert_eq!(
            id,
            Identity {
                sub: "u-1".into(),
                name: Some("alice".into()),
                exp: Some(2000),
                permissions: Permissions::default(),
            }
        );
        let t = sign(&json!({"sub":"u-2"}), KEY);
        assert_eq!(verify(&t, &LAX, 1000).unwrap().name, None);
    }

    #[cfg(feature = "server-api")]
    #[test]
    fn permissions_come_from_rooms_publish_and_admin() {
        let t = sign(
            &json!({"sub":"u","rooms":["general","team-*"],"admin":true}),
            KEY,
        );
        let p = verify(&t, &LAX, 0).unwrap().permissions;
        assert!(p.admin);
        for (room, ok) in [
            ("general", true),
            ("team-a", true),
            ("team-", true),
            ("team", false),
            ("generalx", false),
            ("x", false),
        ] {
            assert_eq!(p.rooms.allows(room), ok, "{room}");
            assert_eq!(
                p.publish.allows(room),
                ok,
                "publish defaults to rooms: {room}"
            );
        }
        let t = sign(&json!({"sub":"u","publish":["news"]}), KEY);
        let p = verify(&t, &LAX, 0).unwrap().permissions;
        assert!(
            p.rooms.allows("anything") && !p.admin,
            "rooms defaults to *"
        );
        assert!(p.publish.allows("news") && !p.publish.allows("general"));
        let t = sign(&json!({"sub":"u","rooms":[]}), KEY);
        let p = verify(&t, &LAX, 0).unwrap().permissions;
        assert!(!p.rooms.allows("general") && !p.publish.allows("general"));
    }

    #[cfg(not(feature = "server-api"))]
    #[test]
    fn a_build_without_permissions_refuses_tokens_that_carry_them() {
        for claims in [
            json!({"sub":"u","rooms":["general"]}),
            json!({"sub":"u","publish":[]}),
            json!({"sub":"u","admin":false}),
        ] {
            assert_eq!(
                verify(&sign(&claims, KEY), &LAX, 0),
                Err(AuthError::Permissions),
                "{claims}"
            );
        }
        assert!(has_key(br#"{"sub":"u", "admin" :true}"#, "admin"));
        for other in [r#"{"sub":"rooms"}"#, r#"{"sub":"u","name":"rooms" }"#] {
            assert!(!has_key(other.as_bytes(), "rooms"), "{other}");
            let t = sign(&serde_json::from_str(other).unwrap(), KEY);
            assert!(
                verify(&t, &LAX, 0).is_ok(),
                "a value is not a claim: {other}"
            );
        }
    }

    #[cfg(feature = "server-api")]
    #[test]
    fn permission_claims_of_the_wrong_shape_refuse_the_token() {
        for bad in [
            json!({"sub":"u","rooms":"general"}),
            json!({"sub":"u","rooms":[1]}),
            json!({"sub":"u","rooms":["a b"]}),
            json!({"sub":"u","rooms":["*x"]}),
            json!({"sub":"u","rooms":[""]}),
            json!({"sub":"u","rooms":["a\u{1}"]}),
            json!({"sub":"u","rooms":[{"a":1}]}),
            json!({"sub":"u","publish":[null]}),
            json!({"sub":"u","admin":"true"}),
            json!({"sub":"u","admin":1}),
            json!({"sub":"u","rooms":["x".repeat(65)]}),
        ] {
            assert_eq!(
                verify(&sign(&bad, KEY), &LAX, 0),
                Err(AuthError::Permissions),
                "{bad}"
            );
        }
        assert!(AuthError::Permissions.text().contains("rooms"));
    }

    #[test]
    fn the_member_name_is_name_else_sub() {
        let t = sign(&json!({"sub":"u-1","name":"alice"}), KEY);
        assert_eq!(verify(&t, &LAX, 0).unwrap().member_name(), "alice");
        let t = sign(&json!({"sub":"u-1"}), KEY);
        assert_eq!(verify(&t, &LAX, 0).unwrap().member_name(), "u-1");
    }

    #[test]
    fn expiry_and_not_before_are_enforced() {
        let t = sign(&json!({"sub":"u","exp":1000}), KEY);
        assert_eq!(verify(&t, &LAX, 1000), Err(AuthError::Expired));
        assert!(verify(&t, &LAX, 999).is_ok());
        let t = sign(&json!({"sub":"u","nbf":1000}), KEY);
        assert_eq!(verify(&t, &LAX, 999), Err(AuthError::NotYetValid));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let none = forge(r#"{"alg":"none"}"#, r#"{"sub":"u"}"#, "");
        assert_eq!(verify(&none, &LAX, 0), Err(AuthError::Algorithm));
        let hs512 = forge(r#"{"alg":"HS512"}"#, r#"{"sub":"u"}"#, "AAAA");
        assert_eq!(verify(&hs512, &LAX, 0), Err(AuthError::Algorithm));
        let lower = forge(r#"{"alg":"hs256"}"#, r#"{"sub":"u"}"#, "AAAA");
        assert_eq!(verify(&lower, &LAX, 0), Err(AuthError::Algorithm));
    }

    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let t = sign(&json!({"sub":"u","name":"alice"}), KEY);
        assert_eq!(
            verify(&t, &Policy::lenient(b"other"), 0),
            Err(AuthError::Signature)
        );
        let parts: Vec<&str> = t.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(r#"{"sub":"admin","name":"alice"}"#);
        let swapped = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(verify(&swapped, &LAX, 0), Err(AuthError::Signature));
        let cut = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..12]);
        assert_eq!(verify(&cut, &LAX, 0), Err(AuthError::Signature));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "a", "a.b", "a.b.c.d", "!!.??.##", &"x".repeat(5000)] {
            assert_eq!(verify(bad, &LAX, 0), Err(AuthError::Malformed), "{bad}");
        }
        let not_json = format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("nope"));
        assert_eq!(verify(&not_json, &LAX, 0), Err(AuthError::Malformed));
    }

    #[test]
    fn claims_must_name_a_subject() {
        assert_eq!(
            verify(&sign(&json!({"name":"a"}), KEY), &LAX, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":""}), KEY), &LAX, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":5}), KEY), &LAX, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":"u","exp":"soon"}), KEY), &LAX, 0),
            Err(AuthError::Claims)
        );
    }

    #[test]
    fn exp_is_required_unless_the_settings_say_otherwise() {
        let strict = Policy {
            require_exp: true,
            ..LAX
        };
        let t = sign(&json!({"sub":"u"}), KEY);
        assert_eq!(verify(&t, &strict, 0), Err(AuthError::NoExpiry));
        assert!(verify(&t, &LAX, 0).is_ok());
        let t = sign(&json!({"sub":"u","exp":10}), KEY);
        assert!(verify(&t, &strict, 9).is_ok());
        let cfg = Config {
            jwt_secret: "k".into(),
            ..Config::default()
        };
        assert!(Policy::of(&cfg).unwrap().require_exp, "on by default");
        assert!(
            Policy::of(&Config::default()).is_none(),
            "no secret: auth off"
        );
    }

    #[test]
    fn audience_and_issuer_are_checked_when_named() {
        let p = Policy {
            audience: "chat",
            issuer: "https://id.example",
            ..LAX
        };
        let iss = "https://id.example";
        for ok in [
            json!({"sub":"u","aud":"chat","iss":iss}),
            json!({"sub":"u","aud":["a","chat"],"iss":iss}),
        ] {
            assert!(verify(&sign(&ok, KEY), &p, 0).is_ok(), "{ok}");
        }
        for (bad, why) in [
            (json!({"sub":"u","iss":iss}), AuthError::Audience),
            (
                json!({"sub":"u","aud":"chats","iss":iss}),
                AuthError::Audience,
            ),
            (json!({"sub":"u","aud":[],"iss":iss}), AuthError::Audience),
            (
                json!({"sub":"u","aud":"CHAT","iss":iss}),
                AuthError::Audience,
            ),
            (json!({"sub":"u","aud":"chat"}), AuthError::Issuer),
            (
                json!({"sub":"u","aud":"chat","iss":"https://id.example/"}),
                AuthError::Issuer,
            ),
            (json!({"sub":"u","aud":5,"iss":iss}), AuthError::Claims),
        ] {
            assert_eq!(verify(&sign(&bad, KEY), &p, 0), Err(why), "{bad}");
        }
        // Not named: not checked.
        assert!(verify(&sign(&json!({"sub":"u","aud":"x","iss":"y"}), KEY), &LAX, 0).is_ok());
    }

    #[test]
    fn absurd_times_neither_panic_nor_end_a_session_early() {
        for exp in [u64::MAX, 1 << 63, u64::MAX - 1] {
            let t = sign(&json!({"sub":"u","exp":exp,"nbf":0}), KEY);
            assert_eq!(verify(&t, &LAX, 2_000_000_000).unwrap().exp, Some(exp));
        }
        let t = sign(&json!({"sub":"u","nbf":u64::MAX}), KEY);
        assert_eq!(verify(&t, &LAX, u64::MAX - 1), Err(AuthError::NotYetValid));
        let t = sign(&json!({"sub":"u","exp":1e30}), KEY);
        assert_eq!(verify(&t, &LAX, 0), Err(AuthError::Claims), "not a u64");
        let t = sign(&json!({"sub":"u","exp":-1}), KEY);
        assert_eq!(verify(&t, &LAX, 0), Err(AuthError::Claims));

        let mono = Instant::now();
        // Used to be `mono + Duration::from_secs(exp - now)`: "overflow when adding duration
        // to instant".
        for exp in [u64::MAX, 1 << 63] {
            if let Some(at) = session_deadline(exp, 1_000, mono) {
                assert!(at > mono + Duration::from_secs(100 * 365 * 24 * 3600));
            }
        }
        assert_eq!(
            session_deadline(1_010, 1_000, mono),
            Some(mono + Duration::from_secs(10))
        );
        assert_eq!(session_deadline(5, 1_000, mono), Some(mono), "already due");
    }
}
