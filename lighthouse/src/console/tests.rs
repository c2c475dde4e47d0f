use super::*;
use proptest::prelude::*;

const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

fn get(path: &str, query: Option<&str>) -> Result<Route, PageError> {
    parse("GET", path, query, None, b"").map(|(r, _)| r)
}

#[test]
fn every_page_and_its_parameters() {
    assert_eq!(get("/", None).unwrap(), Route::Overview);
    assert_eq!(
        get(
            "/nodes",
            Some("q=CI-Job&group=ci&ephemeral=true&after=100.64.0.9")
        )
        .unwrap(),
        Route::Nodes {
            filter: NodeFilter {
                text: Some("ci-job".into()),
                group: Some("ci".into()),
                ephemeral: Some(true)
            },
            after: Some(Ipv4Addr::new(100, 64, 0, 9)),
        }
    );
    // An empty form field is no filter.
    assert_eq!(
        get("/nodes", Some("q=&group=&ephemeral=")).unwrap(),
        Route::Nodes {
            filter: NodeFilter::default(),
            after: None
        }
    );
    assert_eq!(
        get("/nodes/100.64.0.7", None).unwrap(),
        Route::Node(Ipv4Addr::new(100, 64, 0, 7))
    );
    assert_eq!(
        get("/nodes/100.64.0.7/revoke", None).unwrap(),
        Route::ConfirmRevoke(Ipv4Addr::new(100, 64, 0, 7))
    );
    assert_eq!(
        get("/events", Some("view=overview")).unwrap(),
        Route::Events(LiveView::Overview)
    );
    assert!(matches!(
        get("/static/console.js", None).unwrap(),
        Route::Asset(a) if a.content_type.starts_with("text/javascript")
    ));
    assert_eq!(get("/nodes/nonsense", None).unwrap_err().status, 400);
    assert_eq!(
        get("/nodes", Some("ephemeral=maybe")).unwrap_err().status,
        400
    );
    assert_eq!(get("/events", Some("view=tokens")).unwrap_err().status, 400);
    assert_eq!(get("/etc/passwd", None).unwrap_err().status, 404);
    assert_eq!(
        parse("DELETE", "/tokens", None, None, b"")
            .unwrap_err()
            .status,
        405
    );
}

#[test]
fn forms_carry_their_token_and_are_checked() {
    let fp = "ab".repeat(32);
    let body = format!("csrf=T1&fingerprint={}", fp.to_uppercase());
    let (route, csrf) = parse("POST", "/revocations", None, FORM, body.as_bytes()).unwrap();
    assert_eq!(route, Route::Revoke { fingerprint: fp });
    assert!(route.is_write());
    assert_eq!(csrf.as_deref(), Some("T1"));

    let (route, _) = parse(
        "POST",
        "/tokens",
        None,
        FORM,
        b"csrf=x&groups=ci%2C+deploy&uses=3&ttl=2h&cert_ttl=",
    )
    .unwrap();
    assert_eq!(
        route,
        Route::CreateToken(NewTokenRequest {
            groups: vec!["ci".into(), "deploy".into()],
            uses: 3,
            ttl: "2h".into(),
            cert_ttl: "1h".into(),
        })
    );
    let (route, _) = parse("POST", "/tokens/delete", None, FORM, b"id=ABCDEF0123").unwrap();
    assert_eq!(
        route,
        Route::DeleteToken {
            id: "abcdef0123".into()
        }
    );
    // What is wrong is named.
    let e = parse("POST", "/tokens", None, FORM, b"groups=&uses=0").unwrap_err();
    assert!(e.message.contains("groups"), "{e:?}");
    let e = parse("POST", "/tokens", None, FORM, b"groups=ci&uses=0").unwrap_err();
    assert!(e.message.contains("uses"), "{e:?}");
    let e = parse("POST", "/revocations", None, FORM, b"fingerprint=abc").unwrap_err();
    assert!(e.message.contains("fingerprint"), "{e:?}");
    // A form as JSON, or too big, is refused.
    assert_eq!(
        parse("POST", "/tokens", None, Some("application/json"), b"{}")
            .unwrap_err()
            .status,
        415
    );
    let big = vec![b'a'; MAX_BODY + 1];
    assert_eq!(
        parse("POST", "/tokens", None, FORM, &big)
            .unwrap_err()
            .status,
        413
    );
}

#[test]
fn a_csrf_token_is_good_for_its_caller_for_twelve_hours_only() {
    let csrf = Csrf::new().unwrap();
    let now = 1_800_000_000;
    let t = csrf.token("fp-admin", now);
    assert!(csrf.verify("fp-admin", &t, now));
    assert!(csrf.verify("fp-admin", &t, now + 11 * 3600));
    assert!(!csrf.verify("fp-admin", &t, now + 13 * 3600));
    assert!(
        !csrf.verify("fp-other", &t, now),
        "bound to the certificate"
    );
    assert!(
        !csrf.verify("fp-admin", &t, now - 7200),
        "not from the future"
    );
    // Another lighthouse's (or a restarted one's) tokens are not good.
    assert!(!Csrf::new().unwrap().verify("fp-admin", &t, now));
    for garbage in ["", ".", "x.y", "1.", &format!("{}.AAAA", now / 3600)] {
        assert!(!csrf.verify("fp-admin", garbage, now), "{garbage:?}");
    }
}

#[test]
fn only_the_lighthouses_own_hosts_and_same_origin_writes() {
    let hosts = AllowedHosts::new(
        Ipv4Addr::new(100, 64, 0, 1),
        "LH-1",
        &["console.mesh.example".into()],
    );
    for good in [
        "100.64.0.1",
        "100.64.0.1:80",
        "lh-1",
        "lh-1.tern",
        "LH-1.tern.",
        "console.mesh.example:8080",
        "127.0.0.1:18080",
        "localhost:9",
        "[::1]:80",
    ] {
        assert!(hosts.allows(good), "{good}");
    }
    for bad in [
        "evil.example",
        "100.64.0.2",
        "lh-1.evil.example",
        "100.64.0.1:99999",
        "[::2]:80",
        "",
        "100.64.0.1:",
    ] {
        assert!(!hosts.allows(bad), "{bad}");
    }
    let host = Some("100.64.0.1");
    assert!(check_origin(false, host, None, None, &hosts).is_ok());
    assert!(check_origin(false, Some("evil.example"), None, None, &hosts).is_err());
    assert!(check_origin(
        true,
        host,
        Some("http://100.64.0.1"),
        Some("same-origin"),
        &hosts
    )
    .is_ok());
    assert!(
        check_origin(true, host, None, None, &hosts).is_ok(),
        "curl: CSRF token or JSON decides"
    );
    let e = check_origin(true, host, Some("http://100.64.0.9"), None, &hosts).unwrap_err();
    assert!(e.contains("100.64.0.9"), "{e}");
    assert!(check_origin(true, host, Some("null"), None, &hosts).is_err());
    assert!(check_origin(true, host, None, Some("cross-site"), &hosts).is_err());
    assert!(check_origin(true, host, None, Some("same-site"), &hosts).is_err());
}

#[test]
fn pages_escape_what_nodes_and_stores_say() {
    use tern_lighthouse_core::admin::NodesPage;
    let node = tern_lighthouse_core::admin::AdminNode {
        name: "<script>alert(1)</script>".into(),
        overlay_ip: Ipv4Addr::new(100, 64, 0, 5),
        groups: vec!["ci\"><b>".into()],
        fingerprint: "ab".repeat(32),
        not_after: 0,
        expires: "1970-01-01T00:00:00Z".into(),
        ephemeral: true,
        issued_by: Some("<i>".into()),
        observed: "198.18.0.2:4242".parse().unwrap(),
        local: vec![],
        transport: "udp",
        routes: vec![],
        zones: vec![],
        runner: None,
        relayed_with: vec![Ipv4Addr::new(100, 64, 0, 6)],
        enrollment: None,
        registered_secs_ago: 5,
        last_seen_secs_ago: 1,
    };
    let page = NodesPage {
        nodes: vec![node.clone()],
        total: 1,
        next: Some(Ipv4Addr::new(100, 64, 0, 5)),
    };
    let filter = NodeFilter {
        text: Some("\"><script>".into()),
        ..NodeFilter::default()
    };
    let html = pages::nodes(&page, &filter, None).0;
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("relay for 1"));
    assert!(
        html.contains("q=%22%3E%3Cscript%3E"),
        "the next link keeps the filter, encoded: {html}"
    );
    let viewer = pages::Viewer {
        name: "admin".into(),
        groups: vec!["admin".into()],
        can_write: true,
        csrf: "TOKEN".into(),
        by_certificate: true,
    };
    let html = pages::node(&node, None, &[], &viewer).0;
    assert!(!html.contains("<script>") && !html.contains("<i>") && !html.contains("<b>"));
    assert!(html.contains("/nodes/100.64.0.5/revoke"));
    let html = pages::confirm_revoke(&node, &viewer).0;
    assert!(html.contains("name=\"csrf\" value=\"TOKEN\""), "{html}");
    // A reader sees no form.
    let reader = pages::Viewer {
        can_write: false,
        ..viewer
    };
    assert!(!pages::node(&node, None, &[], &reader).0.contains("/revoke"));
    assert!(!pages::tokens(&[], &reader).0.contains("<form"));
}

#[test]
fn flows_are_filtered_by_the_url_and_shown_escaped_with_their_claims() {
    let route = |query: &str| get("/flows", Some(query));
    let Ok(Route::Flows(q)) =
        route("claim=repository%3Dacme%2Fapp&dest=198.19.0.0%2F24%3A5432&denied=true&since=1h")
    else {
        panic!("{:?}", route("claim=repository%3Dacme%2Fapp"))
    };
    assert_eq!(q.claim, Some(("repository".into(), "acme/app".into())));
    assert!(q.denied);
    assert_eq!(route("dest=nowhere").unwrap_err().status, 400);
    assert_eq!(route("limit=0").unwrap_err().status, 400);
    let mut view = tern_shared::flows::FlowView::new(
        "gw-1",
        &tern_shared::flows::FlowEntry {
            seq: 1,
            start_ms: 1_800_000_000_000,
            end_ms: 1_800_000_000_900,
            caller: "<b>ci</b>".into(),
            fingerprint: tern_shared::cert::Fingerprint([1; 32]),
            groups: vec!["ci".into()],
            src: Ipv4Addr::new(100, 64, 100, 7),
            src_port: 40000,
            dst: Ipv4Addr::new(198, 19, 0, 10),
            dst_port: 22,
            dst_port_last: 25,
            proto: 6,
            allowed: false,
            rule: Some(2),
            reason: tern_shared::flows::FlowEnd::Denied,
            bytes_in: 120,
            packets_in: 2,
            bytes_out: 0,
            packets_out: 0,
        },
    );
    view.enrollment =
        Some(serde_json::json!({"how": "oidc", "claims": {"repository": "<i>acme</i>/app"}}));
    let html = pages::flows(&[view], &q, &[]).0;
    assert!(
        !html.contains("<b>ci") && !html.contains("<i>acme"),
        "{html}"
    );
    assert!(html.contains("198.19.0.10:22-25/tcp"), "{html}");
    assert!(html.contains("deny (rule-2)"), "{html}");
    assert!(
        html.contains("repository=&lt;i&gt;acme&lt;/i&gt;/app"),
        "{html}"
    );
    assert!(
        html.contains("value=\"repository=acme/app\""),
        "the form keeps the question: {html}"
    );
    assert!(pages::flows(&[], &q, &[])
        .0
        .contains("No flow records match"));
}

#[test]
fn an_event_carries_every_line_of_its_fragment() {
    let e = pages::sse_event(&maud::PreEscaped("<p>a</p>\n<p>b</p>".to_string()));
    assert_eq!(e, "event: update\ndata: <p>a</p>\ndata: <p>b</p>\n\n");
}

proptest! {
    #[test]
    fn garbage_gets_an_answer_never_a_panic(
        method in "(GET|POST|PUT|HEAD|[A-Z]{0,8})",
        path in "(/|/nodes|/tokens|/revocations|/events|/issued)[ -~]{0,40}",
        query in proptest::option::of("[ -~]{0,80}"),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Err(e) = parse(&method, &path, query.as_deref(), FORM, &body) {
            prop_assert!((400..500).contains(&e.status), "{e:?}");
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn any_host_header_is_judged_without_a_panic(host in "[ -~]{0,80}") {
        let hosts = AllowedHosts::new(Ipv4Addr::new(100, 64, 0, 1), "lh", &[]);
        let _ = hosts.allows(&host);
        let _ = check_origin(true, Some(&host), Some(&host), Some(&host), &hosts);
    }
}
