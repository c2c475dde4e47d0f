//! Release archives, end to end on loopback, no root: `ci/package.sh`
//! packages the built binaries (the debug build here, `--bin-dir`) into
//! `tern-<version>-<arch>-linux.tar.gz` and `SHA256SUMS`; the archive holds
//! what a machine installs, with the debug info split off; then
//! `ci/tern-ci.sh install` downloads it from python's `http.server` as a CI
//! job would from a release page, checks it against `SHA256SUMS` (and a
//! pinned `TERN_SHA256`) and runs the binary. A tampered archive, a wrong pin,
//! an archive `SHA256SUMS` does not list and a release without `SHA256SUMS`
//! are refused with exit 66, nothing unpacked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tern_shared::exit;
use tern_tests::{bin, free_tcp, need_tool, output_text, repo_root, run_bounded, wait_until};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    repo_root()
}

fn text(out: &Output) -> String {
    output_text(out)
}

fn arch() -> String {
    let out = Command::new("uname").arg("-m").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// python3's http.server serving `dir` on 127.0.0.1; stopped (by its PID)
/// on drop.
struct WebServer {
    child: Child,
    port: u16,
}

impl WebServer {
    fn serve(dir: &Path) -> WebServer {
        let port = free_tcp();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting python3 -m http.server");
        let server = WebServer { child, port };
        wait_until("http.server listens", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in for GitHub's release pages (python's http.server):
/// `OWNER/REPO/releases/latest` redirects to `.../releases/tag/vVERSION`, as
/// GitHub does; the rest is files.
struct GitHubLike(WebServer);

impl GitHubLike {
    fn serve(dir: &Path, version: &str) -> GitHubLike {
        let script = dir.join("github_like.py");
        fs::write(
            &script,
            r#"import http.server, sys
root, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Releases(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def route(self):
        if self.path.endswith("/releases/latest"):
            self.send_response(302)
            self.send_header("Location", self.path[: -len("latest")] + "tag/v" + version)
            self.end_headers()
            return True
        if "/releases/tag/" in self.path:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False
    def do_HEAD(self):
        self.route() or super().do_HEAD()
    def do_GET(self):
        self.route() or super().do_GET()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Releases).serve_forever()
"#,
        )
        .unwrap();
        let port = free_tcp();
        let child = Command::new("python3")
            .arg(&script)
            .arg(dir)
            .arg(port.to_string())
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting python3");
        let server = WebServer { child, port };
        wait_until("the release pages listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        GitHubLike(server)
    }
}

/// `bash ci/tern-ci.sh install` with only these inputs, and a PATH without
/// any `tern` (so that it downloads).
fn install(state: &Path, env: &[(&str, String)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(repo().join("ci/tern-ci.sh")).arg("install");
    for (key, _) in std::env::vars() {
        if ["TERN_", "GITHUB_", "ACTIONS_", "RUNNER_"]
            .iter()
            .any(|p| key.starts_with(p))
        {
            c.env_remove(key);
        }
    }
    c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    c.env("TERN_STATE_DIR", state);
    for (key, value) in env {
        c.env(key, value);
    }
    run_bounded(c, "tern-ci.sh install", Duration::from_secs(120))
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn a_packaged_release_downloads_verified_and_tampering_is_refused() {
    let test = "release";
    for (tool, package) in [
        ("objcopy", "binutils"),
        ("objdump", "binutils"),
        ("readelf", "binutils"),
        ("python3", "python3"),
        ("curl", "curl"),
        ("sha256sum", "coreutils"),
    ] {
        if !need_tool(test, tool, package) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let release = site.join(format!("download/v{VERSION}"));
    let arch = arch();
    let name = format!("tern-{VERSION}-{arch}-linux");
    let archive = release.join(format!("{name}.tar.gz"));

    // 1. Package the debug build.
    let mut package = Command::new("bash");
    package
        .arg(repo().join("ci/package.sh"))
        .arg("--bin-dir")
        .arg(bin("tern").parent().unwrap())
        .arg("--out")
        .arg(&release)
        .env("GZIP_LEVEL", "1")
        .env("TMPDIR", dir.path());
    let out = run_bounded(package, "ci/package.sh", Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    assert!(archive.is_file(), "{}", text(&out));
    assert!(release.join(format!("{name}-debug.tar.gz")).is_file());

    // SHA256SUMS verifies and lists both archives.
    let sums = fs::read_to_string(release.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&release)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));

    // The archive holds what a machine installs; the binaries have no debug
    // info and point at their split-off debug files.
    let unpacked = dir.path().join("unpacked");
    fs::create_dir_all(&unpacked).unwrap();
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(tar.status.success(), "{}", text(&tar));
    let top = unpacked.join(&name);
    for file in [
        "bin/tern",
        "bin/tern-lighthouse",
        "config/node.toml",
        "config/lighthouse.toml",
        "README.md",
        "LICENSE",
        "BUILDINFO",
    ] {
        assert!(
            top.join(file).is_file(),
            "{file} missing from {name}.tar.gz"
        );
    }
    let units: Vec<_> = fs::read_dir(top.join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        units.iter().any(|u| u == "tern-lighthouse.service"),
        "{units:?}"
    );
    assert!(units.iter().any(|u| u == "tern@.service"), "{units:?}");
    for b in ["tern", "tern-lighthouse"] {
        let sections = Command::new("readelf")
            .args(["-S", "-W"])
            .arg(top.join("bin").join(b))
            .output()
            .unwrap();
        let sections = String::from_utf8_lossy(&sections.stdout);
        assert!(!sections.contains(".debug_info"), "{b} is not stripped");
        assert!(sections.contains(".gnu_debuglink"), "{b}: no debug link");
    }
    let info = fs::read_to_string(top.join("BUILDINFO")).unwrap();
    assert!(info.contains(&format!("version: {VERSION}")), "{info}");
    assert!(info.contains("linking: dynamic, glibc 2."), "{info}");
    let runs = Command::new(top.join("bin/tern"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout).trim(),
        format!("tern {VERSION}")
    );

    // 2. Download it as a CI job does, from a web server.
    let web = WebServer::serve(&site);
    let url = format!(
        "http://127.0.0.1:{}/download/v{{version}}/tern-{{version}}-{{arch}}-linux.tar.gz",
        web.port
    );
    let inputs = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("TERN_VERSION", VERSION.to_string()),
            ("TERN_DOWNLOAD_URL", url.clone()),
        ];
        env.extend_from_slice(extra);
        env
    };
    let good = sha256(&archive);
    let state = dir.path().join("job");
    let out = install(&state, &inputs(&[("TERN_SHA256", good.to_uppercase())]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let installed = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(installed, state.join("bin/tern"), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("verified {name}.tar.gz: sha256 {good}")),
        "{}",
        text(&out)
    );
    let runs = Command::new(&installed).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout).trim(),
        format!("tern {VERSION}")
    );

    // On GitHub Actions without a version: the latest release of the
    // action's repository, found where releases/latest redirects.
    let github = dir.path().join("github");
    let on_github = github.join(format!("acme/tern/releases/download/v{VERSION}"));
    fs::create_dir_all(&on_github).unwrap();
    for f in [format!("{name}.tar.gz"), "SHA256SUMS".to_string()] {
        fs::copy(release.join(&f), on_github.join(&f)).unwrap();
    }
    let releases = GitHubLike::serve(&github, VERSION);
    let state = dir.path().join("latest");
    let out = install(
        &state,
        &[
            ("GITHUB_ACTIONS", "true".to_string()),
            (
                "GITHUB_SERVER_URL",
                format!("http://127.0.0.1:{}", releases.0.port),
            ),
            (
                "GITHUB_ACTION_PATH",
                dir.path()
                    .join("runner/_actions/acme/tern/v1")
                    .to_string_lossy()
                    .into_owned(),
            ),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "acme/tern/releases/download/v{VERSION}/{name}.tar.gz"
        )),
        "{}",
        text(&out)
    );
    assert!(state.join("bin/tern").is_file());
    drop(releases);

    // 3. Refusals, each with exit 66 and nothing unpacked.
    let refused = |state: &Path, out: &Output, why: &str| {
        assert_eq!(
            out.status.code(),
            Some(i32::from(exit::DOWNLOAD_UNVERIFIED)),
            "{}",
            text(out)
        );
        assert!(text(out).contains(why), "{}", text(out));
        assert!(!state.join("bin/tern").exists(), "unpacked anyway");
        assert!(!state.join("tern.tar.gz").exists(), "archive left behind");
    };
    // A wrong pin.
    let wrong = "0".repeat(64);
    let state = dir.path().join("wrong-pin");
    let out = install(&state, &inputs(&[("TERN_SHA256", wrong)]));
    refused(&state, &out, "does not match TERN_SHA256");

    // A tampered archive: one byte changed after SHA256SUMS was written.
    let mut bytes = fs::read(&archive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    fs::write(&archive, &bytes).unwrap();
    let state = dir.path().join("tampered");
    let out = install(&state, &inputs(&[]));
    refused(&state, &out, "does not match its release's SHA256SUMS");
    // ... even when pinned to the tampered bytes (SHA256SUMS still says no).
    let state = dir.path().join("tampered-pinned");
    let out = install(&state, &inputs(&[("TERN_SHA256", sha256(&archive))]));
    refused(&state, &out, "does not match its release's SHA256SUMS");

    // An archive SHA256SUMS does not list.
    let other = release.join(format!("tern-{VERSION}-other-linux.tar.gz"));
    fs::write(&other, &bytes).unwrap();
    let state = dir.path().join("unlisted");
    let other_url = format!(
        "http://127.0.0.1:{}/download/v{{version}}/tern-{{version}}-other-linux.tar.gz",
        web.port
    );
    let out = install(
        &state,
        &[
            ("TERN_VERSION", VERSION.to_string()),
            ("TERN_DOWNLOAD_URL", other_url),
        ],
    );
    refused(&state, &out, "does not list");

    // No SHA256SUMS and no pin: cannot verify, refused.
    fs::remove_file(release.join("SHA256SUMS")).unwrap();
    let state = dir.path().join("no-sums");
    let out = install(&state, &inputs(&[]));
    refused(&state, &out, "no SHA256SUMS");
}
