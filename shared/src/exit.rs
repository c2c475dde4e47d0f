//! The exit codes of `tern`, each defined once (sysexits' numbers where one
//! fits). Scripts and CI templates build on them: they are documented in
//! `tern up --help`, `tern run --help` and the README, and never change.
//! A number may serve two commands when it means the same there (69: the
//! service the command needs is unavailable, a lighthouse for `tern up`, a
//! runner for `tern run`).

/// Done: `tern up --wait-for` reached its target, every step of `tern run`
/// passed (or failed with `continue_on_error`).
pub const SUCCESS: u8 = 0;
/// `tern run`: the pipeline file or the command line is wrong; nothing was
/// sent (`EX_DATAERR`).
pub const BAD_PIPELINE: u8 = 65;
/// Not `tern`'s own: `ci/tern-ci.sh` (and so the GitHub Action and the GitLab
/// template) exits with it when a downloaded release archive does not match
/// its release's `SHA256SUMS` or the pinned `TERN_SHA256`; nothing was
/// unpacked or run. Reserved here so that no command of `tern` takes it
/// (`EX_NOINPUT`: the input is not what it must be).
pub const DOWNLOAD_UNVERIFIED: u8 = 66;
/// No way to the address: no gateway routes the target (`tern up
/// --wait-for`), no lighthouse knows the address or name (`tern ping`)
/// (`EX_NOHOST`).
pub const NO_PATH: u8 = 68;
/// The service the command needs is unavailable: no lighthouse answered or
/// registered this node (`tern up`), no runner with that label or name
/// could be reached (`tern run`) (`EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// `tern up --wait-for`: the target refused the connection (the gateway's
/// firewall lets this node in).
pub const TARGET_REFUSED: u8 = 70;
/// `tern up --wait-for`: the peer in front of the target (the gateway, or
/// the peer itself) says its firewall does not let this node in.
pub const DENIED_BY_POLICY: u8 = 71;
/// `tern up`: another node already answers on this config's API socket;
/// nothing was started.
pub const SOCKET_TAKEN: u8 = 73;
/// `tern run`: the job ran, but its artifacts could not be written here.
pub const ARTIFACTS: u8 = 74;
/// `tern run`: the runner went away in the middle of the job.
pub const RUNNER_LOST: u8 = STORE_UNAVAILABLE;
/// `tern up --enroll-*`: every lighthouse that answered refused the
/// enrollment because it could not reach its store (its database is down);
/// nothing was spent, so the same token or ID token may be tried again
/// shortly (`EX_TEMPFAIL`; `tern run` uses the number for a runner lost
/// mid-job: a failure that a later try may not meet).
pub const STORE_UNAVAILABLE: u8 = 75;
/// `tern up`: a lighthouse said this node's certificate is revoked; the
/// node stopped.
pub const REVOKED: u8 = 76;
/// Refused: the lighthouse refused the enrollment (`tern up`), the runner's
/// policy refused this caller (`tern run`) (`EX_NOPERM`).
pub const REFUSED: u8 = 77;
/// `tern up --enroll-oidc` found no ID token to send (`EX_CONFIG`).
pub const NO_OIDC_TOKEN: u8 = 78;
/// No answer in time: `--wait-timeout`, a job's or step's time limit.
pub const TIMED_OUT: u8 = 124;
/// `tern run` was cancelled (SIGINT/SIGTERM; the job's process group is
/// killed).
pub const CANCELLED: u8 = 130;
