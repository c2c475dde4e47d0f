//! `userspace-bench`: what userspace mode costs against TUN mode, measured
//! in one run on real kernels (needs root, iperf3 and python3):
//!
//! - TCP throughput from a CI node to a server in a private network
//!   (198.19.0.0/24), through a gateway: both nodes in TUN mode (the kernel
//!   routes and forwards), and both in userspace mode (iperf3 through a
//!   `[[forwards]]` port on the client; the gateway proxies with ordinary
//!   sockets);
//! - per-connection setup: connect, send a byte, get it echoed back, for
//!   fresh connections one after the other.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/userspace-bench [--reps N] [--seconds S] [--write]
//! ```
//!
//! `--write` replaces the userspace section of BENCHMARKS.md.

use std::process::ExitCode;
use std::time::Duration;

use tern_netns_tests::report::{cell, machine_line, median, write_section, RepsArgs};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, wait_until, Lab, Ns, Proc};

const SERVER: &str = "198.19.0.10";
const CONNECTS: usize = 100;

/// A lighthouse, a vpc with iperf3 and an echo server on 198.19.0.10, and a
/// client and a gateway, both in TUN mode or both in userspace mode.
struct World {
    _lab: Lab,
    client: Ns,
    /// Where the client dials: the server itself (TUN), or the forwards.
    iperf: (String, u16),
    echo: (String, u16),
    _procs: Vec<Proc>,
}

fn world(prefix: &str, userspace: bool) -> World {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let client = lab.add_ns("ci");
    let gw = lab.add_ns("gw");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&client, "198.18.0.2/24");
    lab.connect_to_wan(&gw, "198.18.0.4/24");
    lab.bridge(&vpc, "br1", "198.19.0.10/24");
    lab.connect_to_bridge(&gw, "198.19.0.2/24", &vpc, "br1");
    let mut procs = vec![
        vpc.spawn("iperf3", ["-s", "-B", SERVER, "-p", "5201"], "iperf3-server"),
        vpc.spawn(
            "python3",
            [
                "-c",
                &format!(
                    "import socketserver\nclass H(socketserver.BaseRequestHandler):\n  def handle(self):\n    d=self.request.recv(64)\n    self.request.sendall(d)\nsocketserver.ThreadingTCPServer.allow_reuse_address=True\nsocketserver.ThreadingTCPServer(('{SERVER}',7007),H).serve_forever()\n"
                ),
            ],
            "echo-server",
        ),
    ];
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci-1", "100.64.0.20/10", &["--groups", "ci"]);
    sign(
        &dir,
        "ca",
        "gw-1",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    procs.push(start_lighthouse(&lh, &write_lighthouse_config(&dir)));
    let mode = |text: String| {
        if userspace {
            text.replace("[tun]\n", "[tun]\nmode = \"userspace\"\n")
                .replace("level = \"debug\"", "level = \"info\"")
        } else {
            text.replace("level = \"debug\"", "level = \"info\"")
        }
    };
    let gw_config = format!(
        "{}[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n[[firewall.inbound]]\nproto = \"tcp\"\nlocal_cidr = \"198.19.0.0/24\"\n",
        mode(node_config_text("gw-1", "ca.crt"))
    );
    procs.push(start_node(
        &gw,
        &write_file(&dir, "gw-1.toml", &gw_config),
        "node-gw",
    ));
    let forwards = if userspace {
        format!(
            "[[forwards]]\nlisten = \"127.0.0.1:15201\"\ntarget = \"{SERVER}:5201\"\n[[forwards]]\nlisten = \"127.0.0.1:17007\"\ntarget = \"{SERVER}:7007\"\n"
        )
    } else {
        String::new()
    };
    let client_config = format!(
        "{}[[firewall.inbound]]\nproto = \"any\"\n{forwards}",
        mode(node_config_text("ci-1", "ca.crt"))
    );
    procs.push(start_node(
        &client,
        &write_file(&dir, "ci-1.toml", &client_config),
        "node-ci",
    ));
    let (iperf, echo) = if userspace {
        (
            ("127.0.0.1".to_string(), 15201),
            ("127.0.0.1".to_string(), 17007),
        )
    } else {
        ((SERVER.to_string(), 5201), (SERVER.to_string(), 7007))
    };
    let w = World {
        _lab: lab,
        client,
        iperf,
        echo,
        _procs: procs,
    };
    // Warm up: the route learned, the tunnel up, the echo server answering.
    wait_until("the echo server answers", Duration::from_secs(30), || {
        connect_times(&w, 1).is_some_and(|t| !t.is_empty())
    });
    w
}

fn iperf(w: &World, seconds: u32) -> Option<f64> {
    let secs = seconds.to_string();
    let port = w.iperf.1.to_string();
    let out = w.client.exec_timeout(
        "iperf3",
        ["-c", w.iperf.0.as_str(), "-p", &port, "-t", &secs, "-J"],
        Duration::from_secs(seconds as u64 + 30),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
}

/// `n` fresh connections one after the other, each until its byte comes
/// back; milliseconds each (a Python client inside the client namespace).
fn connect_times(w: &World, n: usize) -> Option<Vec<f64>> {
    let code = format!(
        "import socket,time\nfor _ in range({n}):\n  t=time.perf_counter()\n  s=socket.create_connection(('{}',{}),timeout=5)\n  s.sendall(b'x')\n  assert s.recv(1)==b'x'\n  print((time.perf_counter()-t)*1000)\n  s.close()\n",
        w.echo.0, w.echo.1
    );
    let out = w
        .client
        .exec_timeout("python3", ["-c", &code], Duration::from_secs(60))?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
    )
}

fn main() -> ExitCode {
    let args = match RepsArgs::parse("userspace-bench") {
        Ok(a) => a,
        Err(e) => {
            eprintln!("userspace-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("userspace-bench")
        || !require_tools("userspace-bench", &["iperf3", "python3", "iptables"])
    {
        return ExitCode::from(2);
    }
    // Per mode: throughput (Gbit/s), connect p50 and p95 (ms), per rep.
    let mut figures: [(Vec<f64>, Vec<f64>, Vec<f64>); 2] = Default::default();
    let mut ratios: (Vec<f64>, Vec<f64>) = Default::default();
    for rep in 1..=args.reps {
        let mut this = [None, None];
        for (i, userspace) in [false, true].into_iter().enumerate() {
            let w = world(if userspace { "ubuser" } else { "ubtun" }, userspace);
            let gbps = iperf(&w, args.seconds);
            let times = connect_times(&w, CONNECTS).unwrap_or_default();
            let (p50, p95) = if times.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                let mut t = times.clone();
                (
                    median(&mut t),
                    tern_netns_tests::report::percentile(&times, 0.95),
                )
            };
            if let Some(g) = gbps {
                figures[i].0.push(g);
            }
            figures[i].1.push(p50);
            figures[i].2.push(p95);
            this[i] = Some((gbps, p50));
            eprintln!(
                "userspace-bench: rep {rep}/{}: {}: {gbps:?} Gbit/s, connect p50 {p50:.2} ms p95 {p95:.2} ms",
                args.reps,
                if userspace { "userspace" } else { "tun" }
            );
        }
        if let [Some((Some(t), tp)), Some((Some(u), up))] = this {
            ratios.0.push(u / t);
            ratios.1.push(up / tp);
        }
    }
    let table = format!(
        "## Userspace mode against TUN mode\n\n\
         {}\n\
         Command: `userspace-bench --reps {} --seconds {}` (a lighthouse, a CI node and a gateway \
         in front of a private network, both nodes in TUN mode, then both in userspace mode, \
         built afresh for each).\n\n\
         | metric | TUN mode | userspace mode | userspace / TUN |\n|---|---|---|---|\n\
         | TCP throughput, CI node → private server through the gateway (Gbit/s) | {} | {} | {} |\n\
         | connection setup: connect, one byte echoed, p50 of {CONNECTS} (ms) | {} | {} | {} |\n\
         | connection setup p95 (ms) | {} | {} | — |\n\n\
         In TUN mode the client's kernel routes the private subnet into its TUN device and \
         the gateway's kernel forwards (and masquerades) into the private network. In \
         userspace mode neither node has a TUN device or any privilege: iperf3 and the echo \
         client dial a `[[forwards]]` port on the client, whose in-process TCP/IP stack \
         (smoltcp) carries the connection through the mesh; the gateway's stack accepts it \
         only after its ordinary socket to the target connected. Cells are median (min–max) \
         across repetitions; ratios are per repetition.\n",
        machine_line(),
        args.reps,
        args.seconds,
        cell(&figures[0].0, 2),
        cell(&figures[1].0, 2),
        cell(&ratios.0, 2),
        cell(&figures[0].1, 2),
        cell(&figures[1].1, 2),
        cell(&ratios.1, 2),
        cell(&figures[0].2, 2),
        cell(&figures[1].2, 2),
    );
    println!("{table}");
    if args.write {
        match write_section("userspace", &table) {
            Ok(path) => eprintln!("userspace-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("userspace-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
