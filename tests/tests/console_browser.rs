//! The admin console in a real browser: headless Chromium from Debian,
//! driven over WebDriver (chromedriver; the fantoccini client), reaching
//! the lighthouse's overlay address through an admin's Tern node (its
//! SOCKS5 proxy, userspace mode), on loopback, no root. The overview sees a
//! CI job join without a reload; a token is made with the form and its
//! secret read once; the job is revoked with the confirmation and leaves
//! the node list; a page of another origin posting a form to the console
//! is refused. Every page is screenshot under
//! `target/console-screenshots/` (at a laptop's and a phone's width) and
//! checked with axe-core (vendored for this test only,
//! `tests/vendor/axe-core`): no serious or critical violation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use tern_tests::enroll_lab::{lab_with, sign_by_root, Lab};
use tern_tests::{free_tcp, need_tool, repo_root, wait_until, Daemon};

/// This file's private network (each test file its own).
const SUBNET: &str = "127.86.0";
const CONSOLE: &str = "http://100.64.0.1";

/// chromedriver and the browsers it starts, in a process group of their
/// own: ended together, by that group, when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(log: &Path) -> Driver {
        let port = free_tcp();
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group is the driver's PID: it and the browsers it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// An admin node (group admin) in userspace mode whose SOCKS5 proxy leads
/// into the mesh; returns it and the proxy's port.
fn admin_node(lab: &Lab) -> (Daemon, u16) {
    let d = lab.dir.path();
    sign_by_root(d, "admin-1", "100.64.0.9/10", "admin");
    let socks = free_tcp();
    let config = lab.ci_config_to("admin-1", &[]);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[pki]\nca = \"ca.crt\"\n",
        "[pki]\nca = \"ca.crt\"\ncert = \"admin-1.crt\"\nkey = \"admin-1.key\"\n",
        1,
    ) + &format!("[proxy]\nsocks5 = \"127.0.0.1:{socks}\"\n");
    std::fs::write(&config, text).unwrap();
    let node = Daemon::start(
        "tern",
        &["up", "--config", &config.to_string_lossy()],
        d.join("admin-1.log"),
    );
    (node, socks)
}

fn screenshots() -> PathBuf {
    let dir = repo_root().join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The page as it is now: a screenshot, and axe-core's verdict (serious
/// or critical violations fail the test, named).
async fn check_page(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
    let axe =
        std::fs::read_to_string(repo_root().join("tests/vendor/axe-core/axe.min.js")).unwrap();
    c.execute(&axe, vec![]).await.unwrap();
    let found = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { resultTypes: ['violations'] })
               .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.map(n => n.html).slice(0, 3) }))))
               .catch(e => done([{ id: 'axe-error', impact: 'critical', help: String(e), nodes: [] }]));",
            vec![],
        )
        .await
        .unwrap();
    let bad: Vec<&serde_json::Value> = found
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
        .collect();
    assert!(bad.is_empty(), "{name}: accessibility violations: {bad:#?}");
    if !found.as_array().unwrap().is_empty() {
        eprintln!("{name}: minor accessibility findings: {found}");
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `f` (async) every 100 ms until it holds, or panics naming `what`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?}: {what}");
}

#[test]
fn an_admin_watches_a_job_join_makes_a_token_and_revokes_the_job_in_a_browser() {
    if !need_tool("console_browser", "chromium", "chromium")
        || !need_tool("console_browser", "chromedriver", "chromium-driver")
        || !need_tool("console_browser", "python3", "python3")
    {
        return;
    }
    let lab = lab_with(SUBNET, "");
    let (_admin, socks) = admin_node(&lab);
    let socket = lab.dir.path().join("admin-1.sock");
    wait_until("the admin node is up", Duration::from_secs(20), || {
        socket.exists()
    });
    // A page of another origin that posts a form to the console.
    let evil_dir = lab.dir.path().join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    std::fs::write(
        evil_dir.join("index.html"),
        format!(
            "<!doctype html><html lang=en><title>elsewhere</title><body>\
             <form id=f method=post action=\"{CONSOLE}/tokens\">\
             <input name=csrf value=guess><input name=groups value=admin></form>\
             <script>document.getElementById('f').submit()</script></body></html>"
        ),
    )
    .unwrap();
    let evil_port = free_tcp();
    let _evil = Daemon {
        child: Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &evil_port.to_string(),
            ])
            .current_dir(&evil_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        log: lab.dir.path().join("evil.log"),
    };

    let driver = Driver::start(&lab.dir.path().join("chromedriver.log"));
    let profile = lab.dir.path().join("chromium-profile");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--no-first-run", "--window-size=1280,1000",
                    format!("--proxy-server=socks5://127.0.0.1:{socks}"),
                    format!("--user-data-dir={}", profile.display()),
                ]
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{}", driver.port))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("chromedriver: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let result = the_walk(&c, &lab, evil_port).await;
        let _ = c.close().await;
        result
    });
}

async fn the_walk(c: &Client, lab: &Lab, evil_port: u16) {
    // The overview, through the mesh (the lighthouse may take a moment to
    // know the admin node).
    eventually(
        "the console's overview loads",
        Duration::from_secs(30),
        || async {
            c.goto(&format!("{CONSOLE}/")).await.is_ok()
                && c.find(Locator::Css("#nodes-online")).await.is_ok()
        },
    )
    .await;
    check_page(c, "overview").await;
    let before: u32 = text(c, "#nodes-online").await.parse().unwrap();

    // A token from the form: the secret shown once.
    c.goto(&format!("{CONSOLE}/tokens")).await.unwrap();
    check_page(c, "tokens").await;
    let form = c.form(Locator::Css("form.create")).await.unwrap();
    form.set_by_name("groups", "ci").await.unwrap();
    form.submit().await.unwrap();
    let secret = c
        .wait()
        .for_element(Locator::Id("secret"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(secret.starts_with("tern1_"), "{secret}");
    check_page(c, "token-created").await;
    c.goto(&format!("{CONSOLE}/tokens")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&secret),
        "the secret is shown once"
    );

    // The overview, live: a CI job enrolls with that token and appears
    // without a reload.
    c.goto(&format!("{CONSOLE}/")).await.unwrap();
    eventually(
        "the overview's live view connects",
        Duration::from_secs(10),
        || async {
            let region = c.find(Locator::Css("[data-live]")).await.unwrap();
            region.attr("data-updated").await.unwrap().is_some()
        },
    )
    .await;
    let (_job, _) = lab.start_job("ci-job-7", &secret);
    eventually(
        "the job appears on the overview without a reload",
        Duration::from_secs(20),
        || async { text(c, "#nodes-online").await.parse::<u32>().unwrap() == before + 1 },
    )
    .await;
    check_page(c, "overview-after-join").await;

    // The node list (enrolled nodes), the job's page, revocation with
    // its confirmation.
    c.goto(&format!("{CONSOLE}/nodes?ephemeral=true"))
        .await
        .unwrap();
    check_page(c, "nodes").await;
    // The only enrolled node is the job (its name is its own: ci-vm-...).
    // The list is live: its rows may be drawn anew between finding the
    // link and reading it, so it is read again until it holds still.
    let mut found = None;
    for _ in 0..20 {
        let Ok(link) = c.find(Locator::Css("#nodes tbody a")).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let (Ok(name), Ok(Some(href))) = (link.text().await, link.attr("href").await) {
            found = Some((name, href));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (job, href) = found.expect("the job's row in the node list");
    assert!(job.starts_with("ci-"), "{job}");
    c.goto(&format!("{CONSOLE}{href}")).await.unwrap();
    c.wait().for_element(Locator::Css("code.fp")).await.unwrap();
    let page = c.source().await.unwrap();
    assert!(
        page.contains("token") && page.contains("ci"),
        "the job's enrollment is shown: {page}"
    );
    check_page(c, "node").await;
    c.find(Locator::Css("a.danger"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("form[action='/revocations']"))
        .await
        .unwrap();
    check_page(c, "confirm-revoke").await;
    c.find(Locator::Css("form[action='/revocations'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let status = c
        .wait()
        .for_element(Locator::Css("[role=status]"))
        .await
        .unwrap();
    assert!(status
        .text()
        .await
        .unwrap()
        .contains(&format!("Revoked {job}")));
    check_page(c, "revoked").await;
    eventually(
        "the revoked job leaves the node list",
        Duration::from_secs(20),
        || async {
            c.goto(&format!("{CONSOLE}/nodes")).await.unwrap();
            !c.source().await.unwrap().contains(&job)
        },
    )
    .await;
    for page in ["revocations", "issued", "flows", "gateways", "runners"] {
        c.goto(&format!("{CONSOLE}/{page}")).await.unwrap();
        check_page(c, page).await;
    }

    // At a phone's width.
    c.set_window_size(390, 844).await.unwrap();
    for (page, path) in [("phone-overview", "/"), ("phone-nodes", "/nodes")] {
        c.goto(&format!("{CONSOLE}{path}")).await.unwrap();
        check_page(c, page).await;
    }
    c.set_window_size(1280, 1000).await.unwrap();

    // A page elsewhere posts a form to the console through the admin's
    // node: refused, nothing made.
    let before_tokens = tokens_count(c).await;
    c.goto(&format!("http://127.0.0.1:{evil_port}/"))
        .await
        .unwrap();
    eventually(
        "the cross-origin form is answered",
        Duration::from_secs(10),
        || async { c.current_url().await.unwrap().as_str().starts_with(CONSOLE) },
    )
    .await;
    let page = c.source().await.unwrap();
    assert!(page.contains("is refused"), "{page}");
    check_page(c, "cross-origin-refused").await;
    let after_tokens = tokens_count(c).await;
    assert_eq!(
        before_tokens, after_tokens,
        "the cross-origin form made nothing"
    );
}

/// The token table's rows.
async fn tokens_count(c: &Client) -> usize {
    c.goto(&format!("{CONSOLE}/tokens")).await.unwrap();
    let rows = c.find_all(Locator::Css("#tokens tbody tr")).await.unwrap();
    rows.len()
}
