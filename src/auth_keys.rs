//! Public-key tokens: RS256 and ES256 JWTs from an identity provider, checked against the key
//! of `--jwt-public-key` (a PEM `PUBLIC KEY`, RSA of 2048 to 8192 bits or EC P-256), with
//! `ring` (cargo feature `tls`; without it the setting is refused at start).
//!
//! The key decides which algorithm it accepts: an RSA key only `RS256`, a P-256 key only
//! `ES256`. A token whose `alg` names the other one, `HS256` (checked with `--jwt-secret`
//! only, never with the public key's bytes: the classic algorithm-confusion attack) or `none`
//! is refused before any signature is looked at. Keys are read when the server starts (and
//! again on `SIGHUP`) and kept, by path, for the verifications; no file is read per token.

use std::sync::Arc;
#[cfg(feature = "tls")]
use std::sync::Mutex;

use crate::auth::AuthError;

/// A public key as `ring` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA: the PKCS#1 `RSAPublicKey` DER; verifies `RS256` (PKCS#1 v1.5, SHA-256).
    Rsa(Vec<u8>),
    /// EC P-256: the uncompressed point; verifies `ES256` (64-byte `r || s`, SHA-256).
    EcP256(Vec<u8>),
}

impl PublicKey {
    /// The one `alg` this key verifies.
    pub fn alg(&self) -> &'static str {
        match self {
            PublicKey::Rsa(_) => "RS256",
            PublicKey::EcP256(_) => "ES256",
        }
    }
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let bad = || "not valid DER".to_string();
    let (&tag, rest) = input.split_first().ok_or_else(bad)?;
    let (&first, rest) = rest.split_first().ok_or_else(bad)?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81..=0x83 => {
            let width = usize::from(first & 0x7f);
            if rest.len() < width {
                return Err(bad());
            }
            let len = rest[..width]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[width..])
        }
        _ => return Err(bad()),
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BIT_STRING: u8 = 0x03;
const INTEGER: u8 = 0x02;
/// 1.2.840.113549.1.1.1
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.10045.2.1
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Reads a `SubjectPublicKeyInfo` (the DER inside a PEM `PUBLIC KEY`).
pub fn parse_spki(spki: &[u8]) -> Result<PublicKey, String> {
    let (tag, info, _) = der(spki)?;
    let (alg_tag, alg, rest) = der(info)?;
    let (bits_tag, bits, _) = der(rest)?;
    if tag != SEQUENCE || alg_tag != SEQUENCE || bits_tag != BIT_STRING {
        return Err("not a SubjectPublicKeyInfo".into());
    }
    let (oid_tag, oid, params) = der(alg)?;
    if oid_tag != OID {
        return Err("not a SubjectPublicKeyInfo".into());
    }
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err("the key's BIT STRING is malformed".into()),
    };
    if oid == RSA_ENCRYPTION {
        // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
        let (seq, body, _) = der(key)?;
        let (int, modulus, _) = der(body)?;
        if seq != SEQUENCE || int != INTEGER {
            return Err("the RSA key is malformed".into());
        }
        let modulus = match modulus.split_first() {
            Some((0, m)) => m,
            _ => modulus,
        };
        let bits = modulus.len() * 8;
        if !(2048..=8192).contains(&bits) {
            return Err(format!(
                "the RSA key has {bits} bits; 2048 to 8192 are accepted"
            ));
        }
        return Ok(PublicKey::Rsa(key.to_vec()));
    }
    if oid == EC_PUBLIC_KEY {
        let curve = der(params)
            .ok()
            .filter(|(t, _, _)| *t == OID)
            .map(|(_, c, _)| c);
        if curve != Some(PRIME256V1) {
            return Err("the EC key is not on P-256 (only ES256 is accepted)".into());
        }
        if key.len() != 65 || key[0] != 0x04 {
            return Err("the EC key is not an uncompressed P-256 point".into());
        }
        return Ok(PublicKey::EcP256(key.to_vec()));
    }
    Err("the key is neither RSA nor EC (RS256 and ES256 are accepted)".into())
}

/// Keys loaded so far, by path: the server loads its key at start, verifications find it here.
#[cfg(feature = "tls")]
static KEYS: Mutex<Vec<(String, Arc<PublicKey>)>> = Mutex::new(Vec::new());

/// Reads the PEM file at `path` and keeps its key for [`verify`] (replacing a key loaded from
/// the same path before). The error names the file and what is wrong with it.
#[cfg(feature = "tls")]
pub fn load(path: &str) -> Result<Arc<PublicKey>, String> {
    use rustls::pki_types::SubjectPublicKeyInfoDer;
    use rustls::pki_types::pem::PemObject;
    let spki = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read the JWT public key {path}: {e} (a PEM `PUBLIC KEY` block is expected; \
             `openssl pkey -pubin -in KEY -out PUB` converts an `RSA PUBLIC KEY`)"
        )
    })?;
    let key = Arc::new(
        parse_spki(spki.as_ref())
            .map_err(|e| format!("cannot use the JWT public key {path}: {e}"))?,
    );
    let mut keys = KEYS.lock().unwrap_or_else(|p| p.into_inner());
    keys.retain(|(p, _)| p != path);
    keys.push((path.to_string(), key.clone()));
    Ok(key)
}

/// Without the `tls` feature there is no `ring`: the setting is refused at start.
#[cfg(not(feature = "tls"))]
pub fn load(path: &str) -> Result<Arc<PublicKey>, String> {
    Err(format!(
        "--jwt-public-key {path}: this chatterbox is built without the `tls` feature"
    ))
}

#[cfg(feature = "tls")]
fn key_at(path: &str) -> Option<Arc<PublicKey>> {
    let found = KEYS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, k)| k.clone());
    // A `Config` built in code without the server's start: read it now, once.
    found.or_else(|| load(path).ok())
}

/// Checks the signature of `signing_input` (`header.claims`, as sent) for a token whose
/// header says `alg`, with the key loaded from `path`.
pub fn verify(
    alg: &str,
    path: &str,
    signing_input: &[u8],
    signature: &[u8],
) -> Result<(), AuthError> {
    #[cfg(feature = "tls")]
    {
        let key = key_at(path).ok_or(AuthError::Signature)?;
        if alg != key.alg() {
            return Err(AuthError::Algorithm);
        }
        verify_with(&key, signing_input, signature)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (alg, path, signing_input, signature);
        Err(AuthError::Algorithm)
    }
}

/// Checks a signature with `key`, in the one algorithm the key allows.
#[cfg(feature = "tls")]
pub fn verify_with(
    key: &PublicKey,
    signing_input: &[u8],
    signature: &[u8],
) -> Result<(), AuthError> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    let checked = match key {
        PublicKey::Rsa(der) => UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
            .verify(signing_input, signature),
        PublicKey::EcP256(point) => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(signing_input, signature)
        }
    };
    checked.map_err(|_| AuthError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DER of a SubjectPublicKeyInfo around `key` with algorithm `alg` (+ `params`).
    fn spki(alg: &[u8], params: &[u8], key: &[u8]) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match body.len() {
                n if n < 0x80 => out.push(n as u8),
                n if n < 0x100 => out.extend([0x81, n as u8]),
                n => out.extend([0x82, (n >> 8) as u8, n as u8]),
            }
            out.extend_from_slice(body);
            out
        }
        let mut a = tlv(OID, alg);
        a.extend_from_slice(params);
        let mut bits = vec![0];
        bits.extend_from_slice(key);
        let mut info = tlv(SEQUENCE, &a);
        info.extend(tlv(BIT_STRING, &bits));
        tlv(SEQUENCE, &info)
    }

    fn rsa_key(modulus_bytes: usize) -> Vec<u8> {
        let mut n = vec![0u8];
        n.extend(vec![0xc5; modulus_bytes]);
        let mut body = vec![INTEGER, 0x82, (n.len() >> 8) as u8, n.len() as u8];
        body.extend(n);
        body.extend([INTEGER, 3, 1, 0, 1]);
        let mut seq = vec![SEQUENCE, 0x82, (body.len() >> 8) as u8, body.len() as u8];
        seq.extend(body);
        seq
    }

    #[test]
    fn rsa_and_p256_keys_are_read_and_others_refused() {
        let rsa = rsa_key(256);
        assert_eq!(
            parse_spki(&spki(RSA_ENCRYPTION, &[0x05, 0x00], &rsa)),
            Ok(PublicKey::Rsa(rsa.clone()))
        );
        let e = parse_spki(&spki(RSA_ENCRYPTION, &[0x05, 0x00], &rsa_key(128))).unwrap_err();
        assert!(e.contains("1024 bits"), "{e}");
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        let p256 = [&[OID, 8][..], PRIME256V1].concat();
        assert_eq!(
            parse_spki(&spki(EC_PUBLIC_KEY, &p256, &point)),
            Ok(PublicKey::EcP256(point.clone()))
        );
        // P-384's OID (1.3.132.0.34) is refused: ES384 is not accepted.
        let p384 = [OID, 5, 0x2b, 0x81, 0x04, 0x00, 0x22];
        assert!(parse_spki(&spki(EC_PUBLIC_KEY, &p384, &point)).is_err());
        // Ed25519 (1.3.101.112).
        assert!(parse_spki(&spki(&[0x2b, 0x65, 0x70], &[], &[1; 32])).is_err());
        // A compressed point.
        assert!(parse_spki(&spki(EC_PUBLIC_KEY, &p256, &[2; 33])).is_err());
    }

    #[test]
    fn truncated_or_hostile_der_is_an_error_not_a_panic() {
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        let p256 = [&[OID, 8][..], PRIME256V1].concat();
        let good = spki(EC_PUBLIC_KEY, &p256, &point);
        for cut in 0..good.len() {
            assert!(parse_spki(&good[..cut]).is_err(), "cut at {cut}");
        }
        for junk in [
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0x80],
            &[0xff; 3],
        ] {
            assert!(parse_spki(junk).is_err());
        }
    }
}
