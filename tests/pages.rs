//! The pages compiled into the binary: `/` always, `/admin` with the cargo feature
//! `admin-page` (on by default), answered like any other static page and never framed.

mod common;

use chatterbox::config::Config;
use common::{Running, status};

fn with_jwt() -> Running {
    Running::start(Config {
        db_path: ":memory:".into(),
        jwt_secret: "pages-test-secret".into(),
        ..Config::default()
    })
}

/// The body of `GET {path}`.
fn page(s: &Running, path: &str) -> String {
    let r = s.http(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert_eq!(status(&r), 200, "{path}: {r}");
    r.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn the_chat_page_is_served_without_its_comments_and_indentation() {
    let s = Running::memory();
    let source = include_str!("../src/client/index.html");
    let body = page(&s, "/");
    assert!(body.starts_with("<!doctype html>") && body.trim_end().ends_with("</html>"));
    assert!(
        body.len() < source.len() * 9 / 10,
        "{} of {}",
        body.len(),
        source.len()
    );
    for line in body.lines() {
        assert!(!line.starts_with(char::is_whitespace), "indented: {line:?}");
        assert!(
            !line.starts_with("//") && !line.contains("  // "),
            "a comment: {line:?}"
        );
    }
    // Every line of code is there, as written.
    for code in source
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("function "))
    {
        assert!(body.lines().any(|l| l == code), "lost: {code}");
    }
    assert!(body.contains("if (takeToken()) connect();\n"));
    s.stop();
}

#[cfg(feature = "admin-page")]
#[test]
fn the_admin_page_is_served_as_html_that_no_other_site_may_frame() {
    let s = Running::memory();
    let r = s.http("GET /admin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status(&r), 200, "{r}");
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    let head = format!("{head}\r\n");
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(
        head.contains("Content-Security-Policy: frame-ancestors 'none'\r\n"),
        "{head}"
    );
    assert!(head.contains("X-Frame-Options: DENY\r\n"), "{head}");
    assert!(head.contains("Cache-Control: no-store\r\n"), "{head}");
    assert!(body.starts_with("<!doctype html>") && body.contains("API key"));
    assert!(
        !body.contains("src=\"http") && !body.contains("href=\"http"),
        "no external assets"
    );
    let r = s.http("POST /admin HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert!(
        status(&r) == 405 && r.contains("Allow: GET, HEAD\r\n"),
        "{r}"
    );
    // HEAD: the same head as GET, no body.
    let r = s.http("HEAD /admin HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        head.contains("X-Frame-Options: DENY\r\n") && body.is_empty(),
        "{r}"
    );
    assert_eq!(
        status(&s.http("GET /admin/x HTTP/1.1\r\nHost: t\r\n\r\n")),
        404
    );
    s.stop();
}

#[cfg(feature = "admin-page")]
#[test]
fn with_jwt_on_both_pages_stay_open_the_page_holds_no_secret() {
    let s = with_jwt();
    for path in ["/", "/admin"] {
        let r = s.http(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(status(&r), 200, "{path}: {r}");
        assert!(!r.contains("pages-test-secret"));
    }
    s.stop();
}

#[cfg(not(feature = "admin-page"))]
#[test]
fn without_the_feature_there_is_no_admin_page() {
    let s = Running::memory();
    assert_eq!(
        status(&s.http("GET /admin HTTP/1.1\r\nHost: t\r\n\r\n")),
        404
    );
    let s2 = with_jwt();
    let r = s2.http("GET /admin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status(&r), 404, "{r}");
    assert_eq!(status(&s2.http("GET / HTTP/1.1\r\nHost: t\r\n\r\n")), 200);
    s.stop();
    s2.stop();
}
