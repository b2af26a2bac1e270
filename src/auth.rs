//! Optional authentication: HS256 JSON Web Tokens, checked before the upgrade.
//!
//! Only `HS256` is accepted; `none` and every other algorithm are refused, so a token cannot
//! choose how it is checked. The signature is compared in constant time (`hmac`'s
//! `verify_slice`). Claims used: `sub` (required, the member id), `name` (optional, the member
//! name), `exp` (optional, Unix seconds; enforced at connect and during the session), `nbf`
//! (optional, not before). Tokens are never logged.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Longest token accepted, in bytes: a guard against huge inputs before any decoding.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: becomes the member id.
    pub sub: String,
    /// `name`: becomes the member name, when present.
    pub name: Option<String>,
    /// `exp`: Unix seconds after which the session ends.
    pub exp: Option<u64>,
}

/// Why a token was refused (answered with `401`; the text never repeats the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the query or `Authorization` header.
    Missing,
    /// Not three base64url parts of JSON, or too long.
    Malformed,
    /// `alg` is not `HS256`.
    Algorithm,
    /// The signature does not match.
    Signature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `sub` missing or not a non-empty string, or `name`/`exp` of the wrong type.
    Claims,
}

impl AuthError {
    /// A short text for the `401` body.
    pub fn text(self) -> &'static str {
        match self {
            AuthError::Missing => "a token is required",
            AuthError::Malformed => "the token is malformed",
            AuthError::Algorithm => "the token's algorithm is not accepted (HS256 only)",
            AuthError::Signature => "the token's signature is invalid",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::Claims => "the token's claims are invalid",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    name: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// Checks `token` against `secret` at `now` (Unix seconds).
pub fn verify(token: &str, secret: &[u8], now: u64) -> Result<Identity, AuthError> {
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
    if header.alg != "HS256" {
        return Err(AuthError::Algorithm);
    }
    let signature = decode(s64)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| AuthError::Signature)?;
    mac.update(h64.as_bytes());
    mac.update(b".");
    mac.update(c64.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::Signature)?;
    // Only a signed payload is parsed further.
    let claims: Claims = serde_json::from_slice(&decode(c64)?).map_err(|_| AuthError::Claims)?;
    if claims.exp.is_some_and(|exp| now >= exp) {
        return Err(AuthError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| now < nbf) {
        return Err(AuthError::NotYetValid);
    }
    match claims.sub {
        Some(sub) if !sub.is_empty() && sub.len() <= 128 => Ok(Identity {
            sub,
            name: claims.name,
            exp: claims.exp,
        }),
        _ => Err(AuthError::Claims),
    }
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
        let id = verify(&t, KEY, 1000).unwrap();
        assert_eq!(
            id,
            Identity {
                sub: "u-1".into(),
                name: Some("alice".into()),
                exp: Some(2000)
            }
        );
        let t = sign(&json!({"sub":"u-2"}), KEY);
        assert_eq!(verify(&t, KEY, 1000).unwrap().name, None);
    }

    #[test]
    fn expiry_and_not_before_are_enforced() {
        let t = sign(&json!({"sub":"u","exp":1000}), KEY);
        assert_eq!(verify(&t, KEY, 1000), Err(AuthError::Expired));
        assert!(verify(&t, KEY, 999).is_ok());
        let t = sign(&json!({"sub":"u","nbf":1000}), KEY);
        assert_eq!(verify(&t, KEY, 999), Err(AuthError::NotYetValid));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let none = forge(r#"{"alg":"none"}"#, r#"{"sub":"u"}"#, "");
        assert_eq!(verify(&none, KEY, 0), Err(AuthError::Algorithm));
        let hs512 = forge(r#"{"alg":"HS512"}"#, r#"{"sub":"u"}"#, "AAAA");
        assert_eq!(verify(&hs512, KEY, 0), Err(AuthError::Algorithm));
        let lower = forge(r#"{"alg":"hs256"}"#, r#"{"sub":"u"}"#, "AAAA");
        assert_eq!(verify(&lower, KEY, 0), Err(AuthError::Algorithm));
    }

    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let t = sign(&json!({"sub":"u","name":"alice"}), KEY);
        assert_eq!(verify(&t, b"other", 0), Err(AuthError::Signature));
        let parts: Vec<&str> = t.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(r#"{"sub":"admin","name":"alice"}"#);
        let swapped = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(verify(&swapped, KEY, 0), Err(AuthError::Signature));
        let cut = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..12]);
        assert_eq!(verify(&cut, KEY, 0), Err(AuthError::Signature));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "a", "a.b", "a.b.c.d", "!!.??.##", &"x".repeat(5000)] {
            assert_eq!(verify(bad, KEY, 0), Err(AuthError::Malformed), "{bad}");
        }
        let not_json = format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("nope"));
        assert_eq!(verify(&not_json, KEY, 0), Err(AuthError::Malformed));
    }

    #[test]
    fn claims_must_name_a_subject() {
        assert_eq!(
            verify(&sign(&json!({"name":"a"}), KEY), KEY, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":""}), KEY), KEY, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":5}), KEY), KEY, 0),
            Err(AuthError::Claims)
        );
        assert_eq!(
            verify(&sign(&json!({"sub":"u","exp":"soon"}), KEY), KEY, 0),
            Err(AuthError::Claims)
        );
    }
}
