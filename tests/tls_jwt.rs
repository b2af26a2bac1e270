//! RS256 / ES256 tokens with `--jwt-public-key` (feature `tls`): keys made in the test (ring
//! for P-256, `openssl genpkey` for RSA), tokens accepted on `/ws` and the REST API, and every
//! algorithm trick refused: `none`, the other key type's `alg`, and HS256 signed with the
//! public key's bytes (algorithm confusion).
#![cfg(feature = "tls")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chatterbox::auth::{self, AuthError, Policy};
use chatterbox::config::Config;
use chatterbox::server::Server;
use common::{Running, status};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatterbox-jwt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A fresh P-256 key pair; its public key written as a PEM `PUBLIC KEY` to `dir/name`.
fn ec_key(dir: &Path, name: &str) -> (EcdsaKeyPair, PathBuf, String) {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    // SubjectPublicKeyInfo for id-ecPublicKey on prime256v1, then the 65-byte point.
    let mut spki = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(pair.public_key().as_ref());
    let text = pem("PUBLIC KEY", &spki);
    let path = dir.join(name);
    std::fs::write(&path, &text).unwrap();
    (pair, path, text)
}

/// A fresh RSA key pair of `bits` from `openssl genpkey`; its public key as PEM in `dir`.
fn rsa_key(dir: &Path, name: &str, bits: u32) -> (RsaKeyPair, PathBuf, String) {
    let (private, public) = rsa_files(dir, name, bits);
    let der = PrivatePkcs8KeyDer::from_pem_file(&private).unwrap();
    let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&public).unwrap();
    (pair, public, text)
}

/// `openssl genpkey` an RSA key of `bits`: the private key's file and the public key's.
fn rsa_files(dir: &Path, name: &str, bits: u32) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.private.pem"));
    let public = dir.join(name);
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let bits = format!("rsa_keygen_bits:{bits}");
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &bits,
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (private, public)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn input(alg: &str, claims: &Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{h}.{c}")
}

fn es256(pair: &EcdsaKeyPair, claims: &Value) -> String {
    let input = input("ES256", claims);
    let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn rs256_as(alg: &str, pair: &RsaKeyPair, claims: &Value) -> String {
    let input = input(alg, claims);
    let mut sig = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An HS256 token signed with `secret` (the attacker's choice of key).
fn hs256(secret: &[u8], claims: &Value) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let input = input("HS256", claims);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn policy(public_key: &str) -> Policy<'_> {
    Policy {
        secret: b"",
        require_exp: false,
        audience: "",
        issuer: "",
        public_key,
    }
}

fn load(path: &Path) {
    chatterbox::auth_keys::load(path.to_str().unwrap()).unwrap();
}

#[test]
fn es256_tokens_are_checked_with_the_p256_key() {
    let dir = tempdir("es");
    let (pair, path, public_pem) = ec_key(&dir, "ec.pub");
    let (other, _, _) = ec_key(&dir, "other.pub");
    load(&path);
    let p = policy(path.to_str().unwrap());
    let claims = json!({"sub":"u-1","name":"alice","exp":2000});
    let id = auth::verify(&es256(&pair, &claims), &p, 1000).unwrap();
    assert_eq!(
        (id.sub.as_str(), id.name.as_deref()),
        ("u-1", Some("alice"))
    );
    // The claim rules hold as for HS256.
    assert_eq!(
        auth::verify(&es256(&pair, &claims), &p, 2000),
        Err(AuthError::Expired)
    );
    // Another key's signature, a tampered payload, a cut signature.
    assert_eq!(
        auth::verify(&es256(&other, &claims), &p, 0),
        Err(AuthError::Signature)
    );
    let t = es256(&pair, &claims);
    let parts: Vec<&str> = t.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(json!({"sub":"admin"}).to_string());
    for bad in [
        format!("{}.{evil}.{}", parts[0], parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]),
    ] {
        assert_eq!(auth::verify(&bad, &p, 0), Err(AuthError::Signature));
    }
    // An RS256 header on an EC key, `none`, and HS256 keyed with the public key itself.
    let rs = format!("{}.{}", input("RS256", &claims), parts[2]);
    assert_eq!(auth::verify(&rs, &p, 0), Err(AuthError::Algorithm));
    let none = format!("{}.", input("none", &claims));
    assert_eq!(auth::verify(&none, &p, 0), Err(AuthError::Algorithm));
    // (An empty secret too: HMAC takes empty keys, so HS256 without --jwt-secret is off.)
    for secret in [public_pem.as_bytes(), public_pem.trim().as_bytes(), b""] {
        let confused = hs256(secret, &claims);
        assert_eq!(auth::verify(&confused, &p, 0), Err(AuthError::Algorithm));
    }
}

#[test]
fn rs256_tokens_are_checked_with_the_rsa_key_and_confusion_fails() {
    let dir = tempdir("rs");
    let (pair, path, public_pem) = rsa_key(&dir, "rsa.pub", 2048);
    load(&path);
    let p = policy(path.to_str().unwrap());
    let claims = json!({"sub":"u-2","name":"bob"});
    let id = auth::verify(&rs256_as("RS256", &pair, &claims), &p, 0).unwrap();
    assert_eq!(id.name.as_deref(), Some("bob"));
    // The right signature under another name: ES256 on an RSA key is refused.
    let es = rs256_as("ES256", &pair, &claims);
    assert_eq!(auth::verify(&es, &p, 0), Err(AuthError::Algorithm));
    // Algorithm confusion, with and without a secret configured: HS256 is never checked with
    // the public key, so a token keyed with its PEM (or DER) bytes fails.
    let der = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_file(&path).unwrap();
    let with_secret = Policy {
        secret: b"the real secret",
        ..p
    };
    for secret in [public_pem.as_bytes(), der.as_ref()] {
        let confused = hs256(secret, &claims);
        assert_eq!(auth::verify(&confused, &p, 0), Err(AuthError::Algorithm));
        assert_eq!(
            auth::verify(&confused, &with_secret, 0),
            Err(AuthError::Signature)
        );
    }
    // With both, each token is checked by its own key.
    assert!(auth::verify(&hs256(b"the real secret", &claims), &with_secret, 0).is_ok());
    assert!(auth::verify(&rs256_as("RS256", &pair, &claims), &with_secret, 0).is_ok());
}

#[test]
fn bad_key_files_are_refused_at_start_with_the_path() {
    let dir = tempdir("bad");
    let start = |key: &Path| {
        let cfg = Config {
            host: "127.0.0.1".into(),
            port: 0,
            db_path: ":memory:".into(),
            jwt_public_key: key.to_string_lossy().into_owned(),
            ..Config::default()
        };
        match Server::bind(cfg) {
            Ok(_) => panic!("started with the key {}", key.display()),
            Err(e) => e.to_string(),
        }
    };
    let missing = dir.join("missing.pem");
    let e = start(&missing);
    assert!(e.contains(&*missing.to_string_lossy()), "{e}");
    // PKCS#1 `RSA PUBLIC KEY`: not a `PUBLIC KEY`; the message says how to convert it.
    let (pair, _, _) = rsa_key(&dir, "r.pub", 2048);
    let pkcs1 = dir.join("pkcs1.pem");
    std::fs::write(&pkcs1, pem("RSA PUBLIC KEY", pair.public().as_ref())).unwrap();
    let e = start(&pkcs1);
    assert!(e.contains("PUBLIC KEY") && e.contains("openssl"), "{e}");
    // A private key where the public one belongs.
    let e = start(&dir.join("r.pub.private.pem"));
    assert!(e.contains("r.pub.private.pem"), "{e}");
    // Too short an RSA key.
    let (_, short) = rsa_files(&dir, "short.pub", 1024);
    let e = start(&short);
    assert!(e.contains("1024 bits"), "{e}");
    // Garbage inside the armour.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, pem("PUBLIC KEY", b"\x30\x03\x01\x02\x03")).unwrap();
    let e = start(&junk);
    assert!(e.contains(&*junk.to_string_lossy()), "{e}");
}

#[test]
fn the_server_admits_members_and_rest_calls_by_public_key_token() {
    let dir = tempdir("server");
    let (pair, path, public_pem) = ec_key(&dir, "ec.pub");
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        jwt_public_key: path.to_string_lossy().into_owned(),
        ..Config::default()
    });
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = es256(&pair, &json!({"sub":"u-9","name":"carol","exp":exp}));
    let r = s.http(&common::upgrade_request(&format!("/ws?token={token}"), ""));
    assert_eq!(status(&r), 101, "{r}");
    assert!(r.contains(r#""member":"carol""#), "{r}");
    let rest = |t: &str| {
        s.http(&format!(
            "GET /api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n"
        ))
    };
    assert_eq!(status(&rest(&token)), 200);
    assert_eq!(status(&rest("")), 401);
    let confused = hs256(public_pem.as_bytes(), &json!({"sub":"x","exp":exp}));
    assert_eq!(status(&rest(&confused)), 401);
    let r = s.http(&common::upgrade_request(
        &format!("/ws?token={confused}"),
        "",
    ));
    assert_eq!(status(&r), 401, "{r}");
    s.stop();
}

#[test]
fn sighup_reloads_the_public_key_and_a_bad_file_keeps_the_old_one() {
    let dir = tempdir("reload");
    let (a, a_path, _) = ec_key(&dir, "a.pub");
    let (b, b_path, _) = ec_key(&dir, "b.pub");
    let live = dir.join("live.pub");
    std::fs::copy(&a_path, &live).unwrap();
    let (mut child, addr, log) =
        common::spawn_binary_logged(&["--jwt-public-key".as_ref(), live.as_os_str()]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = json!({"sub":"svc","exp":exp});
    let stats = |t: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        use std::io::{Read, Write};
        s.write_all(
            format!("GET /api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        status(&out)
    };
    let hup = || {
        // SAFETY: `kill` only reads its arguments; the child is ours and not yet reaped.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    };
    assert_eq!(stats(&es256(&a, &claims)), 200);
    assert_eq!(stats(&es256(&b, &claims)), 401);
    std::fs::copy(&b_path, &live).unwrap();
    hup();
    common::wait_log(&log, "JWT public key (ES256) reloaded");
    assert_eq!(stats(&es256(&b, &claims)), 200);
    assert_eq!(stats(&es256(&a, &claims)), 401);
    std::fs::write(
        &live,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    hup();
    let line = common::wait_log(&log, "JWT key reload failed");
    assert!(line.contains(&*live.to_string_lossy()), "{line}");
    assert_eq!(stats(&es256(&b, &claims)), 200, "the old key stays");
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    assert!(child.wait().unwrap().success());
}
