//! The other local socket both daemons open: the Unix socket their CLI asks
//! questions on (`tern status`, `tern run --on`, `tern-lighthouse status`).
//! Created mode 0660, owned by the daemon's user and, with `[api] group`, by
//! that group, so a CI job's unprivileged user can ask a daemon started
//! with sudo.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;

/// Binds the API socket at `path`: creates its directory, replaces a stale
/// socket left by a crash (but refuses one another daemon answers on), sets
/// mode 0660 and, when `group` is given, that group. Errors name the path
/// and what to do.
pub fn bind(path: &Path, group: Option<&str>) -> io::Result<UnixListener> {
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(context(format!(
            "creating the API socket directory {}",
            dir.display()
        )))?;
    }
    if path.exists() {
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
    let listener = UnixListener::bind(path).map_err(context(format!(
        "binding the API socket {}",
        path.display()
    )))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(context(
        format!("setting permissions on {}", path.display()),
    ))?;
    if let Some(name) = group {
        let gid = group_id(name)?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(context(format!(
            "giving the API socket {} to group {name:?} ([api] group)",
            path.display()
        )))?;
    }
    Ok(listener)
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
}
