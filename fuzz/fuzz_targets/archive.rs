//! The runner's archive reader (uploads, artifacts): a tar stream from the
//! other side, unpacked into a fresh directory with limits. Nothing may
//! land outside that directory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_runner::archive::{unpack, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let dest = dir.path().join("workspace");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 64,
    };
    let _ = unpack(data, &dest, limits);
    // Only the workspace was written to.
    let outside: Vec<_> = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        outside,
        vec![std::ffi::OsString::from("workspace")],
        "wrote beside the workspace"
    );
});
