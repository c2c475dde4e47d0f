//! The soak run in brief (one 60 s cycle; `soak-bench` runs ten): downloads
//! through a gateway and a stream of runner jobs while both lighthouses are
//! killed and come back, 5 % loss comes and goes at the CI node's NAT, the
//! NAT rebinds, and the gateway in use is killed. Nothing may arrive
//! corrupt, no job line may be lost, only the gateway's crash may cut a
//! download, and the daemons' memory must not run away. Needs root.

use tern_netns_tests::soak::{run, JOB_LINES};
use tern_netns_tests::{require_root, require_tools, serial};

/// What a cycle may add to a daemon's resident memory. A figure well above
/// what was measured (see RELIABILITY.md), there to catch a leak that grows
/// with the work, not to measure.
const RSS_GROWTH_BOUND_KB: u64 = 32 * 1024;

#[test]
fn a_mesh_at_work_loses_nothing_while_its_parts_fail_and_recover() {
    let test = "soak";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables", "seq"]) {
        return;
    }
    let _serial = serial();
    let r = run("soak", 1);
    eprintln!("{}", r.table());
    for (what, at) in &r.events {
        eprintln!("{at:7.1} s  {what}");
    }
    assert_eq!(r.downloads_corrupt, 0, "no download arrives corrupt");
    assert!(
        r.downloads_intact >= 10,
        "downloads kept going: {} intact",
        r.downloads_intact
    );
    let unexcused = r.cuts_outside_failover();
    assert!(
        unexcused.is_empty(),
        "only a gateway's crash may cut a download: {unexcused:?}"
    );
    assert!(r.jobs >= 3, "jobs kept going: {}", r.jobs);
    assert_eq!(r.lines_lost(), 0, "no job line lost: {:?}", r.bad_jobs);
    assert!(r.bad_jobs.is_empty(), "every job ends 0: {:?}", r.bad_jobs);
    assert!(r.jobs * JOB_LINES == r.job_lines);
    assert!(
        r.gateway_failovers >= 1,
        "the CI node failed over from the killed gateway"
    );
    for (name, start, end) in &r.rss_kb {
        assert!(*start > 0 && *end > 0, "{name}: no RSS read");
        assert!(
            end.saturating_sub(*start) < RSS_GROWTH_BOUND_KB,
            "{name} grew from {start} kB to {end} kB in one cycle"
        );
    }
}
