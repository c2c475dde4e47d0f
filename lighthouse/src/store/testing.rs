//! A real PostgreSQL server for tests (`test-support`): the store suite
//! and the loopback tests of lighthouses sharing one database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use postgres::{Client, NoTls};

/// A real PostgreSQL server of this test's own: `initdb` and `pg_ctl`
/// from Debian's package, run as the `postgres` user in a temporary
/// directory, listening on a Unix socket there only; stopped (by its
/// data directory, so only this server) when dropped.
pub struct TestServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    options: String,
    /// The network namespace it runs in (none: the test's own).
    netns: Option<String>,
    listen: String,
}

impl TestServer {
    /// `None` (with a message) where PostgreSQL is not installed or the
    /// test cannot run it (not root); under `CI=true` that fails.
    pub fn start() -> Option<TestServer> {
        Self::start_at(None, "127.0.0.1", FAST)
    }

    /// A server for benchmarks: its writes reach the disk (fsync on), but
    /// a commit does not wait for its flush (`synchronous_commit=off`),
    /// which is what a lighthouse's SQLite store does (WAL, `synchronous =
    /// NORMAL`): durable but for the last moments before a power cut.
    pub fn start_for_bench() -> Option<TestServer> {
        Self::start_at(None, "127.0.0.1", "-c synchronous_commit=off")
    }

    /// [`TestServer::start`] with TLS on: a CA of the test's own signed the
    /// server's certificate for `localhost` and `127.0.0.1`; its PEM is at
    /// [`TestServer::ca_file`].
    pub fn start_tls() -> Option<TestServer> {
        let mut server = Self::start()?;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "tern test database CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let data = server.dir.path().join("data");
        let (uid, gid) = postgres_ids();
        for (name, pem) in [
            ("server.crt", cert.pem()),
            ("server.key", key.serialize_pem()),
        ] {
            let path = data.join(name);
            std::fs::write(&path, pem).unwrap();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        std::fs::write(server.ca_file(), ca.pem()).unwrap();
        server.stop();
        server.options.push_str(" -c ssl=on");
        server.start_again();
        Some(server)
    }

    /// The PEM of the CA that signed the server's certificate (with
    /// [`TestServer::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// [`TestServer::start`] inside network namespace `netns` (made by the
    /// test), listening on `listen` there (and on its Unix socket, which
    /// the test reaches from anywhere).
    pub fn start_in(netns: &str, listen: &str) -> Option<TestServer> {
        Self::start_at(Some(netns), listen, FAST)
    }

    fn start_at(netns: Option<&str>, listen: &str, durability: &str) -> Option<TestServer> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .find(|b| b.join("initdb").is_file())
        });
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let (Some(bin), true) = (bin, root) else {
            let why = "PostgreSQL store tests need Debian's postgresql package and root (the server runs as the postgres user)";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipping: {why}");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tern-pg-")
            .tempdir()
            .unwrap();
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let data = dir.path().join("data");
        let initdb = bin.join("initdb");
        run(&[
            &initdb.to_string_lossy(),
            "-D",
            &data.to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "tern",
            "--no-sync",
        ]);
        if listen != "127.0.0.1" {
            // Clients on the test's underlay (its namespaces) are let in
            // like local ones.
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .unwrap();
            writeln!(hba, "host all all 198.18.0.0/16 trust").unwrap();
            // And those of its simulated private networks (a server behind
            // a gateway sees the gateway's address there).
            writeln!(hba, "host all all 198.19.0.0/16 trust").unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let options = format!(
            "-c listen_addresses={listen} -p {port} -k {} {durability} -c max_connections=100",
            dir.path().display()
        );
        let server = TestServer {
            dir,
            bin,
            port,
            options,
            netns: netns.map(str::to_string),
            listen: listen.to_string(),
        };
        server.start_again();
        Some(server)
    }

    /// Stops the server (a fast shutdown: connections are closed), as an
    /// outage of the database would.
    pub fn stop(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        run(&[
            &pg_ctl.to_string_lossy(),
            "-D",
            &self.dir.path().join("data").to_string_lossy(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }

    /// Starts the server (again, after [`TestServer::stop`]), on the same
    /// port with the same data.
    pub fn start_again(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let in_netns: Vec<&str> = match &self.netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => vec![],
        };
        run_in(
            &in_netns,
            &[
                &pg_ctl.to_string_lossy(),
                "-D",
                &self.dir.path().join("data").to_string_lossy(),
                "-o",
                &self.options,
                "-l",
                &self.dir.path().join("log").to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection string for database `db` (its Unix socket).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=tern dbname={db}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// The URL a lighthouse's `[store] url` takes for database `db`.
    pub fn tcp_url(&self, db: &str) -> String {
        format!(
            "postgres://tern@{}:{}/{db}?sslmode=disable",
            self.listen, self.port
        )
    }

    /// A new, empty database.
    pub fn create_db(&self, db: &str) {
        let mut c = Client::connect(&self.url("postgres"), NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Runs a PostgreSQL program as the postgres user; it must succeed.
fn run(args: &[&str]) {
    run_in(&[], args)
}

/// [`run`] under `prefix` (e.g. `ip netns exec NS`).
fn run_in(prefix: &[&str], args: &[&str]) {
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg("runuser");
            c
        }
        None => Command::new("runuser"),
    };
    let out = cmd
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tests need no durability: nothing is flushed to disk.
const FAST: &str = "-c fsync=off";

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("a postgres user");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}
