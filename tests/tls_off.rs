//! Without the `tls` cargo feature, the TLS and public-key settings are refused at start with
//! a message that says how to build a chatterbox that has them.
#![cfg(not(feature = "tls"))]

use chatterbox::config::Config;

fn start(args: &[&str]) -> Result<(), String> {
    Config::from_args(args.iter().map(|s| s.to_string()), |_| None).map(|_| ())
}

#[test]
fn tls_and_public_key_settings_need_the_tls_feature() {
    for args in [
        &["--tls-cert", "c.pem", "--tls-key", "k.pem"][..],
        &["--jwt-public-key", "pub.pem"],
    ] {
        let e = start(args).unwrap_err();
        assert!(e.contains(&args[0][2..]), "{e}");
        assert!(e.contains("--features tls"), "{e}");
    }
    // The pairing rule is checked first, feature or not.
    let e = start(&["--tls-key", "k.pem"]).unwrap_err();
    assert!(e.contains("needs --tls-cert"), "{e}");
    // Environment variables are refused the same way.
    let e = Config::from_args(Vec::<String>::new(), |k| {
        (k == "JWT_PUBLIC_KEY").then(|| "pub.pem".to_string())
    })
    .unwrap_err();
    assert!(e.contains("JWT_PUBLIC_KEY"), "{e}");
    start(&[]).unwrap();
}
