//! The other local socket both daemons open: the Unix socket their CLI asks
//! questions on (`tern status`, `tern run --on`, `tern-lighthouse status`).
//! Created mode 0660, owned by the daemon's user and, with `[api] group`, by
//! that group, so a CI job's unprivileged user can ask a daemon started
//! with sudo.
//!
//! What the CLI sends there (a pipeline and its `--secret` values included)
//! is only as safe as the socket's directory: whoever can write to it can
//! replace the socket. So the directory must be a real directory owned by
//! the daemon's user (or root) and writable by nobody else; [`bind`] creates
//! it so (0700, or 0750 with `[api] group`) and refuses one that is not, and
//! the CLI runs [`check_before_connect`] before it connects.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Binds the API socket at `path`: creates its directory (0700, or 0750 and
/// `group`'s when given), refuses a directory another user could write to
/// ([`check_dir`]), replaces a stale socket left by a crash (but refuses one
/// another daemon answers on, or a symlink), sets mode 0660 and, when
/// `group` is given, that group. Errors name the path and what to do.
pub fn bind(path: &Path, group: Option<&str>) -> io::Result<UnixListener> {
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let gid = group.map(group_id).transpose()?;
    let dir = socket_dir(path);
    create_dir(dir, gid)?;
    // Always, also for a directory that was there before: it may be another
    // user's, made ahead of us to catch what the CLI sends.
    check_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the API socket path {} is a symbolic link; remove it or set [api] socket to another path",
                    path.display()
                ),
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another daemon already serves the API socket {}; stop it or set [api] socket to another path",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(context(format!(
                "removing stale API socket {}",
                path.display()
            )))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(context(format!(
                "looking at the API socket {}",
                path.display()
            ))(e))
        }
    }
    let listener = UnixListener::bind(path).map_err(context(format!(
        "binding the API socket {}",
        path.display()
    )))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(context(
        format!("setting permissions on {}", path.display()),
    ))?;
    if let (Some(name), Some(gid)) = (group, gid) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(context(format!(
            "giving the API socket {} to group {name:?} ([api] group)",
            path.display()
        )))?;
    }
    Ok(listener)
}

/// Makes the socket's directory as [`bind`] does (0700, or 0750 and
/// `group`'s) when it is missing, and refuses one that fails [`check_dir`]:
/// for files that belong beside the socket (a background node's log).
pub fn prepare_dir<'a>(path: &'a Path, group: Option<&str>) -> io::Result<&'a Path> {
    let gid = group.map(group_id).transpose()?;
    let dir = socket_dir(path);
    create_dir(dir, gid)?;
    check_dir(dir)?;
    Ok(dir)
}

/// Refuses an API socket directory that another user could have placed or
/// could write to: it must be a real directory (not a symlink), owned by
/// the effective user or by root (so an unprivileged CLI may use a daemon
/// root started in `/run/tern`), and not writable by group or others (so
/// `/tmp` itself is refused too). The error names the directory, its owner
/// and mode, and what to do.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the API socket directory {}: {e}", dir.display()),
        )
    })?;
    let euid = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    let mode = meta.mode() & 0o7777;
    let problem = if meta.file_type().is_symlink() {
        "is a symbolic link, not a directory".to_string()
    } else if !meta.is_dir() {
        "is not a directory".to_string()
    } else if owner != euid && owner != 0 {
        format!("belongs to another user, not to {}", user_name(euid))
    } else if mode & 0o022 != 0 {
        "is writable by group or others".to_string()
    } else {
        return Ok(());
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing the API socket directory {}: it {problem} (owner {}, mode {mode:04o}); \
             whoever can write there can replace the socket and read what the CLI sends. \
             Remove it, or set [api] socket (or XDG_RUNTIME_DIR) to a directory of your own",
            dir.display(),
            user_name(owner),
        ),
    ))
}

/// The CLI's side of [`check_dir`], run before it connects to `path`: the
/// socket's directory must pass [`check_dir`], and the socket itself must
/// not be a symlink nor belong to a user other than this one or root. A
/// directory that does not exist is an error of kind `NotFound` (no daemon
/// there); a socket that does not exist, or that this user may not look at,
/// is left for the connect to report.
pub fn check_before_connect(path: &Path) -> io::Result<()> {
    let dir = socket_dir(path);
    check_dir(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::new(
            e.kind(),
            format!("the API socket directory {} does not exist", dir.display()),
        ),
        _ => e,
    })?;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(());
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("looking at the API socket {}: {e}", path.display()),
            ))
        }
    };
    let euid = nix::unistd::geteuid().as_raw();
    let problem = if meta.file_type().is_symlink() {
        "is a symbolic link".to_string()
    } else if meta.uid() != euid && meta.uid() != 0 {
        format!(
            "belongs to {}, neither this user nor root",
            user_name(meta.uid())
        )
    } else {
        return Ok(());
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing the API socket {}: it {problem}; remove it, or set [api] socket to a path of your own",
            path.display()
        ),
    ))
}

/// The id of a group by name, from the system's group database.
pub fn group_id(name: &str) -> io::Result<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("[api] group {name:?}: no such group on this machine; create it or name an existing one"),
        )),
        Err(e) => Err(io::Error::other(format!(
            "[api] group {name:?}: looking it up failed: {e}"
        ))),
    }
}

/// The directory a socket path lives in (`.` for a bare file name).
fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Creates the socket's directory when it is missing: its parents as
/// usual, the directory itself 0700, or 0750 and `gid`'s so the group can
/// reach the socket. An existing one is left as it is, for [`check_dir`]
/// to judge.
fn create_dir(dir: &Path, gid: Option<u32>) -> io::Result<()> {
    let context = |what: &str| {
        let what = format!("{what} the API socket directory {}", dir.display());
        move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(context("creating the parents of"))?;
    }
    let mode = if gid.is_some() { 0o750 } else { 0o700 };
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        // Made meanwhile by someone else: check_dir judges it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(context("creating")(e)),
    }
    // Through a descriptor of the directory just made (never a symlink put
    // in its place), and past the umask, which may have taken the group's
    // bits away.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(context("opening"))?;
    handle
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(context("setting the mode of"))?;
    if let Some(gid) = gid {
        std::os::unix::fs::fchown(&handle, None, Some(gid))
            .map_err(context("giving the [api] group"))?;
    }
    Ok(())
}

/// `uid 1000 (alice)`, or just `uid 1000` when the name is unknown.
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_0660_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub/api.sock");
        let first = bind(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o660));
        let err = bind(&path, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("another daemon already serves"), "{err}");
        drop(first);
        // The file stays behind as after a crash: replaced.
        assert!(path.exists());
        assert!(bind(&path, None).is_ok());
    }

    #[tokio::test]
    async fn an_unknown_group_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let err = bind(&dir.path().join("a.sock"), Some("no-such-group-tern"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no-such-group-tern\": no such group"), "{err}");
        let root = group_id("root").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(root, 0);
    }

    #[tokio::test]
    async fn the_socket_is_given_to_the_group() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return; // only root may give a file to any group
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("g.sock");
        let (name, gid) = ["nogroup", "daemon", "bin"]
            .iter()
            .find_map(|g| group_id(g).ok().map(|id| (*g, id)))
            .unwrap_or(("root", 0));
        let _l = bind(&path, Some(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::metadata(&path).map(|m| m.gid()).ok(), Some(gid));
    }

    #[tokio::test]
    async fn a_missing_directory_is_created_0700_and_passes_the_cli_check() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("parent/tern");
        let path = dir.join("api.sock");
        let _l = bind(&path, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode_of(&dir), 0o700);
        check_before_connect(&path).unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn a_missing_directory_is_created_0750_for_the_group() {
        if !root_or_skip("a_missing_directory_is_created_0750_for_the_group") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("tern");
        let (name, gid) = ["nogroup", "daemon", "bin"]
            .iter()
            .find_map(|g| group_id(g).ok().map(|id| (*g, id)))
            .unwrap_or(("root", 0));
        let _l = bind(&dir.join("api.sock"), Some(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode_of(&dir), 0o750);
        assert_eq!(std::fs::metadata(&dir).map(|m| m.gid()).ok(), Some(gid));
    }

    #[tokio::test]
    async fn a_directory_writable_by_group_or_others_is_refused_by_daemon_and_cli() {
        // 1777 is /tmp itself: the sticky bit does not make a socket there safe.
        for mode in [0o777, 0o1777, 0o770, 0o757] {
            let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let dir = tmp.path().join("tern-1000");
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
            let path = dir.join("api.sock");
            let named = format!("{}", dir.display());
            let daemon = refusal(bind(&path, None).map(drop));
            assert!(daemon.contains(&named), "{mode:o}: {daemon}");
            assert!(daemon.contains("writable by group or others"), "{daemon}");
            assert!(daemon.contains(&format!("mode {mode:04o}")), "{daemon}");
            assert!(!path.exists(), "{mode:o}: no socket is made there");
            // The CLI refuses too, also when a socket is there to talk to.
            let _planted = std::os::unix::net::UnixListener::bind(&path);
            let cli = refusal(check_before_connect(&path));
            assert!(cli.contains(&named), "{mode:o}: {cli}");
            assert!(cli.contains("writable by group or others"), "{cli}");
        }
    }

    #[tokio::test]
    async fn a_directory_of_another_user_is_refused_by_daemon_and_cli() {
        if !root_or_skip("a_directory_of_another_user_is_refused_by_daemon_and_cli") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("tern-1000");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("api.sock");
        let named = format!("{}", dir.display());
        let daemon = refusal(bind(&path, None).map(drop));
        assert!(daemon.contains(&named), "{daemon}");
        assert!(daemon.contains("belongs to another user"), "{daemon}");
        assert!(daemon.contains("owner uid 65534"), "{daemon}");
        assert!(!path.exists(), "no socket is made there");
        let _planted = std::os::unix::net::UnixListener::bind(&path);
        let cli = refusal(check_before_connect(&path));
        assert!(cli.contains(&named), "{cli}");
        assert!(cli.contains("owner uid 65534"), "{cli}");
    }

    #[tokio::test]
    async fn a_socket_of_another_user_is_refused_by_the_cli() {
        if !root_or_skip("a_socket_of_another_user_is_refused_by_the_cli") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = tmp.path().join("api.sock");
        let _planted =
            std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::lchown(&path, Some(65534), None).unwrap_or_else(|e| panic!("{e}"));
        let cli = refusal(check_before_connect(&path));
        assert!(cli.contains(&format!("{}", path.display())), "{cli}");
        assert!(cli.contains("uid 65534"), "{cli}");
    }

    #[tokio::test]
    async fn a_symlink_in_place_of_the_directory_is_refused_by_daemon_and_cli() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let real = tmp.path().join("real");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&real)
            .unwrap_or_else(|e| panic!("{e}"));
        let link = tmp.path().join("tern-1000");
        std::os::unix::fs::symlink(&real, &link).unwrap_or_else(|e| panic!("{e}"));
        let path = link.join("api.sock");
        let daemon = refusal(bind(&path, None).map(drop));
        assert!(daemon.contains(&format!("{}", link.display())), "{daemon}");
        assert!(daemon.contains("symbolic link"), "{daemon}");
        assert!(!real.join("api.sock").exists(), "no socket is made there");
        let cli = refusal(check_before_connect(&path));
        assert!(cli.contains("symbolic link"), "{cli}");
    }

    #[tokio::test]
    async fn a_symlink_in_place_of_the_socket_is_refused_by_daemon_and_cli() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let target = tmp.path().join("elsewhere.sock");
        let _elsewhere =
            std::os::unix::net::UnixListener::bind(&target).unwrap_or_else(|e| panic!("{e}"));
        let path = tmp.path().join("api.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap_or_else(|e| panic!("{e}"));
        let daemon = refusal(bind(&path, None).map(drop));
        assert!(daemon.contains("symbolic link"), "{daemon}");
        assert!(target.exists(), "the link's target is left alone");
        let cli = refusal(check_before_connect(&path));
        assert!(cli.contains("symbolic link"), "{cli}");
    }

    #[test]
    fn a_missing_directory_is_not_found_for_the_cli() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("gone");
        let err = check_before_connect(&dir.join("api.sock"))
            .err()
            .unwrap_or_else(|| panic!("a missing directory passed"));
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains(&format!("{}", dir.display())),
            "{err}"
        );
        // A missing socket in a sound directory is left for connect to report.
        assert!(check_before_connect(&tmp.path().join("none.sock")).is_ok());
    }

    fn refusal(result: io::Result<()>) -> String {
        match result {
            Ok(()) => panic!("accepted, should have been refused"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                e.to_string()
            }
        }
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Whether this test may do what only root may (give files away); in
    /// CI (`CI=true`) not being root fails the test instead of skipping it.
    fn root_or_skip(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} must run as root in CI: it gives files to another user");
        }
        eprintln!("skipping {test}: not root");
        false
    }
}
