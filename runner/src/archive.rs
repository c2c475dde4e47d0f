//! Tar archives for uploads and artifacts.
//!
//! A CI job's files travel to a runner's job workspace, and the job's
//! artifacts travel back, as one tar stream cut into chunks. Either side may
//! be hostile, so [`unpack`] trusts nothing in the stream and never writes
//! outside its destination:
//!
//! - Entry names must be relative and free of `..`.
//! - Only regular files, directories and symbolic links are accepted. Hard
//!   links, devices, FIFOs, sparse files and unknown types are refused.
//! - A symbolic link is accepted only if its target is relative and, read
//!   lexically from the link's own directory, stays inside the destination.
//!   `..` may only lead the target (`../lib/x`, not `a/../../x`): after a name
//!   that is itself a link, the kernel resolves `..` against that link's
//!   target, so only leading `..` can be checked without following links.
//! - Nothing is written through a symbolic link: every parent directory of an
//!   entry is checked with `symlink_metadata` (missing ones are created one
//!   at a time), and a link already at an entry's own path is removed, never
//!   followed.
//! - Files get their mode masked with [`MODE_MASK`] (no setuid, setgid,
//!   sticky or group/other write) and no owner is applied. Directory modes in
//!   the archive are ignored.
//! - File content is bounded by [`Limits`], and the headers of each entry
//!   (long names, PAX records, data skipped for non-file entries) by
//!   [`HEADER_BUDGET`], so a stream cannot make us buffer without bound.
//! - A stream that ends without the end-of-archive block is an error, so a
//!   sender that failed halfway is never taken for a complete archive.
//! - The first refused entry stops the unpack with an error. Entries already
//!   unpacked stay; the caller owns `dest` and may remove it.
//!
//! [`pack`] follows the same rules on the sending side, so what it writes is
//! always accepted by [`unpack`]. It never follows links, stores only
//! in-tree relative links, and lists what it leaves out in
//! [`Summary::skipped`]. If it fails, it does not end the archive, so the
//! receiver sees a stream without an end rather than a short archive.
//!
//! Both functions block. Run them on `tokio::task::spawn_blocking` and connect
//! them to async tasks with [`ChunkReader`] and [`ChunkWriter`].
//!
//! The checks use paths, so they hold against any bytes the peer sends. They
//! do not hold against a local process that swaps a checked directory for a
//! link while the unpack runs (that needs `openat`-style descriptors), so do
//! not let a job run in a workspace while an upload is being unpacked there.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use tar::{EntryType, Header};
use tokio::sync::mpsc;

/// Permission bits kept on files: the owner's read, write and execute, and
/// read and execute for everyone else. The executable bit survives, while
/// setuid, setgid, sticky and group/other write never do.
pub const MODE_MASK: u32 = 0o755;

/// Bytes of stream one entry may take before its content: its header, GNU
/// long-name and PAX extension headers, and the padding and data skipped
/// from the entry before. Real archives need a few KiB at most.
pub const HEADER_BUDGET: u64 = 1 << 20;

/// What a pack or unpack did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries left out, each with its reason, e.g. "dist/x: symbolic link
    /// pointing outside (/etc/passwd)".
    pub skipped: Vec<String>,
}

/// Bounds on what an unpack accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total bytes of file content.
    pub max_bytes: u64,
    /// Entries of any type, counting PAX global headers but not the
    /// extension headers that carry long names.
    pub max_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: not found; check the path, or allow missing paths", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: refused: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error(
        "{}: {kind} entries are not accepted; only regular files, directories and symbolic links are",
        path.display()
    )]
    Unsupported { path: PathBuf, kind: String },
    #[error("{}: {why}", path.display())]
    Conflict { path: PathBuf, why: String },
    #[error(
        "the archive holds more than {limit} bytes of file content; raise the limit or send less"
    )]
    TooLarge { limit: u64 },
    #[error("the archive holds more than {limit} entries; raise the limit or send fewer files")]
    TooManyEntries { limit: u64 },
    #[error(
        "an entry's headers (long names, PAX records) or skipped data exceed {limit} bytes; \
         the archive is malformed or hostile"
    )]
    HeaderTooLarge { limit: u64 },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive stream failed: {0}")]
    Stream(#[source] io::Error),
    #[error("the archive stream is corrupt or cut off: {0}")]
    Corrupt(String),
}

/// Packs `paths` (each relative to `root`, a file or a directory taken
/// recursively) into a tar stream written to `sink`, then flushes `sink`.
///
/// Entry names are the paths normalized lexically (`./a` is `a`, `a/../b` is
/// `b`). A path that is absolute or leaves `root` is an error. Symbolic links
/// are never followed: a link whose relative target stays inside `root`
/// (read lexically from the link's directory) is stored as a link, any
/// other link is skipped with its reason, as are sockets, FIFOs, devices and
/// paths that pass through a link. Files keep their mtime and their mode
/// masked with [`MODE_MASK`]; owners are written as 0 with no names.
///
/// A path that does not exist is listed in [`Summary::skipped`] if
/// `missing_ok`, else an [`ArchiveError::NotFound`]. Paths named twice or
/// inside one another are stored once. Directory listings are sorted, so the
/// same tree and `paths` give the same bytes.
///
/// On error the archive is left without its end-of-archive block, so
/// [`unpack`] on the other side fails rather than accepting a short archive.
pub fn pack(
    root: &Path,
    paths: &[PathBuf],
    missing_ok: bool,
    sink: impl Write,
) -> Result<Summary, ArchiveError> {
    let mut packer = Packer {
        root,
        missing_ok,
        builder: tar::Builder::new(Sink {
            inner: sink,
            failed: false,
            closed: false,
        }),
        summary: Summary::default(),
        visited: BTreeSet::new(),
        walked: BTreeSet::new(),
    };
    match paths.iter().try_for_each(|p| packer.add(p)) {
        Ok(()) => packer.finish(),
        Err(e) => {
            // The builder ends the archive when dropped; a closed sink
            // swallows that, so the receiver sees a stream cut short.
            packer.builder.get_mut().closed = true;
            Err(e)
        }
    }
}

/// Unpacks a tar stream into `dest`, an existing directory. See the module
/// documentation for what is accepted and refused.
///
/// Existing files and links at an entry's path are replaced; an existing
/// directory where the archive has a file or link is an
/// [`ArchiveError::Conflict`]. Reading stops right after the first zero block
/// that ends the archive: the second zero block of the end marker and
/// anything after it stay in `source` (pass `&mut reader` to keep using it).
/// Never panics, whatever the bytes.
pub fn unpack(source: impl Read, dest: &Path, limits: Limits) -> Result<Summary, ArchiveError> {
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ArchiveError::Conflict {
                path: dest.to_path_buf(),
                why: "the destination is not a directory".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ArchiveError::NotFound {
                path: dest.to_path_buf(),
            })
        }
        Err(e) => return Err(io_error(dest)(e)),
    }
    let meter = Meter::default();
    let mut archive = tar::Archive::new(Metered {
        inner: source,
        meter: &meter,
    });
    let mut entries = archive.entries().map_err(|e| meter.error(e))?;
    let mut unpacker = Unpacker {
        dest,
        limits,
        meter: &meter,
        summary: Summary::default(),
        buf: vec![0; 64 * 1024],
    };
    let mut count = 0u64;
    loop {
        meter.budget.set(HEADER_BUDGET);
        let entry = match entries.next() {
            None => break,
            Some(entry) => entry.map_err(|e| meter.error(e))?,
        };
        count += 1;
        if count > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        unpacker.entry(entry)?;
    }
    if meter.eof.get() {
        return Err(ArchiveError::Corrupt(
            "the stream ended without the end-of-archive block; the sender stopped early".into(),
        ));
    }
    Ok(unpacker.summary)
}

/// A [`Read`] over chunks arriving on a tokio channel. The stream ends when
/// every sender is dropped; empty chunks are skipped.
///
/// # Panics
///
/// Reading calls [`mpsc::Receiver::blocking_recv`], which panics inside an
/// async context: use it on a `spawn_blocking` thread or a plain thread.
pub struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            chunk: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos >= self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                None => self.done = true,
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A [`Write`] that cuts what is written into chunks of at most `chunk`
/// bytes and sends each full one on a tokio channel. [`flush`](Write::flush)
/// and [`finish`](ChunkWriter::finish) send the partial chunk; dropping the
/// writer does not, so a writer abandoned after an error never passes on a
/// half-written tail. A closed receiver is [`io::ErrorKind::BrokenPipe`].
///
/// # Panics
///
/// Sending calls [`mpsc::Sender::blocking_send`], which panics inside an
/// async context: use it on a `spawn_blocking` thread or a plain thread.
pub struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    chunk: usize,
    buf: Vec<u8>,
}

impl ChunkWriter {
    /// A `chunk` of 0 is taken as 1.
    pub fn new(tx: mpsc::Sender<Vec<u8>>, chunk: usize) -> Self {
        let chunk = chunk.max(1);
        Self {
            tx,
            chunk,
            buf: Vec::with_capacity(chunk.min(PREALLOCATE)),
        }
    }

    /// Sends what is left in the buffer.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()
    }

    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.chunk.min(PREALLOCATE)),
        );
        self.tx.blocking_send(full).map_err(|_| broken_pipe())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.tx.is_closed() {
            return Err(broken_pipe());
        }
        let mut rest = data;
        while !rest.is_empty() {
            let n = (self.chunk - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() >= self.chunk {
                self.send()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.send()
    }
}

/// Most a [`ChunkWriter`] reserves ahead, whatever its chunk size.
const PREALLOCATE: usize = 64 * 1024;

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the receiving side of the archive stream is gone",
    )
}

struct Packer<'a, W: Write> {
    root: &'a Path,
    missing_ok: bool,
    builder: tar::Builder<Sink<W>>,
    summary: Summary,
    /// Every entry name looked at, stored or skipped.
    visited: BTreeSet<PathBuf>,
    /// Directories whose whole subtree has been looked at.
    walked: BTreeSet<PathBuf>,
}

impl<W: Write> Packer<'_, W> {
    fn add(&mut self, requested: &Path) -> Result<(), ArchiveError> {
        let rel = normalize(requested).map_err(|why| ArchiveError::Unsafe {
            path: requested.to_path_buf(),
            why: why.into(),
        })?;
        if self.visited.contains(&rel) || rel.ancestors().skip(1).any(|a| self.walked.contains(a)) {
            return Ok(());
        }
        // A parent that is a link would make the stat below follow it.
        let mut parent = PathBuf::new();
        let components: Vec<_> = rel.components().collect();
        for c in components.iter().take(components.len().saturating_sub(1)) {
            parent.push(c);
            let full = self.root.join(&parent);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    self.visited.insert(rel.clone());
                    self.skip(
                        &rel,
                        format!("path passes through the symbolic link {}", parent.display()),
                    );
                    return Ok(());
                }
                Ok(m) if m.is_dir() => {}
                // Under a file, the path cannot exist.
                Ok(_) => return self.missing(rel),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return self.missing(rel),
                Err(e) => return Err(io_error(&full)(e)),
            }
        }
        self.walk(rel)
    }

    /// Stores `top` and, for a directory, everything under it, depth first
    /// in sorted order, without recursion (trees may be deep).
    fn walk(&mut self, top: PathBuf) -> Result<(), ArchiveError> {
        let mut stack = vec![top.clone()];
        while let Some(rel) = stack.pop() {
            if !self.visited.insert(rel.clone()) {
                continue;
            }
            let full = self.root.join(&rel);
            let meta = match fs::symlink_metadata(&full) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound && rel == top => {
                    return self.missing(rel);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.skip(&rel, "vanished while being packed".into());
                    continue;
                }
                Err(e) => return Err(io_error(&full)(e)),
            };
            let kind = meta.file_type();
            if kind.is_dir() {
                if !rel.as_os_str().is_empty() {
                    self.append_dir(&rel, &full, &meta)?;
                }
                let mut names = fs::read_dir(&full)
                    .and_then(|d| {
                        d.map(|e| e.map(|e| e.file_name()))
                            .collect::<io::Result<Vec<OsString>>>()
                    })
                    .map_err(io_error(&full))?;
                names.sort();
                stack.extend(names.into_iter().rev().map(|n| rel.join(n)));
                self.walked.insert(rel);
            } else if kind.is_file() {
                self.append_file(&rel, &full)?;
            } else if kind.is_symlink() {
                self.append_link(&rel, &full, &meta)?;
            } else {
                let what = if kind.is_socket() {
                    "socket"
                } else if kind.is_fifo() {
                    "FIFO"
                } else if kind.is_block_device() {
                    "block device"
                } else if kind.is_char_device() {
                    "character device"
                } else {
                    "unknown file type"
                };
                self.skip(&rel, format!("{what}, not packed"));
            }
        }
        Ok(())
    }

    fn append_dir(&mut self, rel: &Path, full: &Path, meta: &Metadata) -> Result<(), ArchiveError> {
        let mut header = header(EntryType::Directory, meta.mode() & MODE_MASK, meta.mtime());
        let result = self.builder.append_data(&mut header, rel, io::empty());
        result.map_err(|e| self.append_error(full, e))?;
        self.summary.dirs += 1;
        Ok(())
    }

    fn append_file(&mut self, rel: &Path, full: &Path) -> Result<(), ArchiveError> {
        // The stat said regular file; open without following in case it
        // changed since, and without blocking in case it became a FIFO.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(full)
            .map_err(io_error(full))?;
        let meta = file.metadata().map_err(io_error(full))?;
        if !meta.is_file() {
            self.skip(rel, "changed type while being packed".into());
            return Ok(());
        }
        let size = meta.len();
        let mut header = header(EntryType::Regular, meta.mode() & MODE_MASK, meta.mtime());
        header.set_size(size);
        let data = Exact {
            inner: file,
            left: size,
        };
        let result = self.builder.append_data(&mut header, rel, data);
        result.map_err(|e| self.append_error(full, e))?;
        self.summary.files += 1;
        self.summary.bytes += size;
        Ok(())
    }

    fn append_link(
        &mut self,
        rel: &Path,
        full: &Path,
        meta: &Metadata,
    ) -> Result<(), ArchiveError> {
        let target = fs::read_link(full).map_err(io_error(full))?;
        if let Err(why) = check_link_target(rel, &target) {
            self.skip(rel, why);
            return Ok(());
        }
        let mut header = header(EntryType::Symlink, 0o777, meta.mtime());
        let result = self.builder.append_link(&mut header, rel, &target);
        result.map_err(|e| self.append_error(full, e))?;
        self.summary.links += 1;
        Ok(())
    }

    fn missing(&mut self, rel: PathBuf) -> Result<(), ArchiveError> {
        if !self.missing_ok {
            return Err(ArchiveError::NotFound {
                path: self.root.join(rel),
            });
        }
        self.skip(&rel, "not found".into());
        self.visited.insert(rel);
        Ok(())
    }

    fn skip(&mut self, rel: &Path, why: String) {
        self.summary
            .skipped
            .push(format!("{}: {why}", rel.display()));
    }

    /// Blames the sink if writing to it failed, else the file being read.
    fn append_error(&self, full: &Path, e: io::Error) -> ArchiveError {
        if self.builder.get_ref().failed {
            ArchiveError::Stream(e)
        } else {
            io_error(full)(e)
        }
    }

    fn finish(self) -> Result<Summary, ArchiveError> {
        let mut sink = self.builder.into_inner().map_err(ArchiveError::Stream)?;
        sink.inner.flush().map_err(ArchiveError::Stream)?;
        Ok(self.summary)
    }
}

/// A header with the fields `pack` controls; the builder sets name and
/// checksum.
fn header(kind: EntryType, mode: u32, mtime: i64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(u64::try_from(mtime).unwrap_or(0));
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header
}

/// The archive sink. `failed` tells a sink error from a file error when the
/// builder reports one; `closed` keeps the builder from ending an archive
/// that failed.
struct Sink<W> {
    inner: W,
    failed: bool,
    closed: bool,
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::other("archive abandoned after an error"));
        }
        let result = self.inner.write(buf);
        if matches!(&result, Err(e) if e.kind() != io::ErrorKind::Interrupted) {
            self.failed = true;
        }
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.inner.flush();
        if matches!(&result, Err(e) if e.kind() != io::ErrorKind::Interrupted) {
            self.failed = true;
        }
        result
    }
}

/// Reads exactly `left` bytes: the size already written in the header. A
/// file that shrank is an error rather than a misaligned archive; one that
/// grew is cut at its size when it was opened.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: Limits,
    meter: &'a Meter,
    summary: Summary,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let rel = entry_name(&entry.path_bytes())?;
        match kind {
            EntryType::Regular | EntryType::Continuous => self.file(entry, rel),
            EntryType::Directory => self.dir(rel),
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(Cow::into_owned)
                    .unwrap_or_default();
                self.link(rel, Path::new(OsStr::from_bytes(&target)))
            }
            EntryType::Link => Err(ArchiveError::Unsafe {
                path: rel,
                why: "hard links are not accepted (they can name any file the receiver can reach)"
                    .into(),
            }),
            other => Err(ArchiveError::Unsupported {
                path: rel,
                kind: kind_name(other),
            }),
        }
    }

    fn file<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        rel: PathBuf,
    ) -> Result<(), ArchiveError> {
        not_dest_itself(&rel)?;
        let size = entry.size();
        let total = self
            .summary
            .bytes
            .checked_add(size)
            .filter(|t| *t <= self.limits.max_bytes)
            .ok_or(ArchiveError::TooLarge {
                limit: self.limits.max_bytes,
            })?;
        let mode = entry.header().mode().map_err(|e| {
            ArchiveError::Corrupt(format!("{}: unreadable mode field: {e}", rel.display()))
        })? & MODE_MASK;
        let mtime = entry.header().mtime().ok();
        let path = self.parents(&rel)?;
        clear(&path, &rel)?;
        // create_new is O_EXCL, which never follows a link at the path.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_error(&path))?;
        self.meter.budget.set(size);
        let result = self
            .copy(&mut entry, &mut file, size, &rel, &path)
            .and_then(|()| {
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(io_error(&path))
            });
        if let Err(e) = result {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        // The mtime is a courtesy to incremental builds: a value the file
        // system refuses is not worth failing over.
        if let Some(t) = mtime.and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))) {
            let _ = file.set_modified(t);
        }
        self.summary.files += 1;
        self.summary.bytes = total;
        Ok(())
    }

    fn copy(
        &mut self,
        entry: &mut impl Read,
        file: &mut File,
        size: u64,
        rel: &Path,
        path: &Path,
    ) -> Result<(), ArchiveError> {
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.meter.error(e)),
            };
            file.write_all(&self.buf[..n]).map_err(io_error(path))?;
            written += n as u64;
        }
        if written != size {
            return Err(ArchiveError::Corrupt(format!(
                "{}: the stream ends inside this file ({written} of {size} bytes)",
                rel.display()
            )));
        }
        Ok(())
    }

    fn dir(&mut self, rel: PathBuf) -> Result<(), ArchiveError> {
        if rel.as_os_str().is_empty() {
            // "./": the destination itself.
            return Ok(());
        }
        let path = self.parents(&rel)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ArchiveError::Unsafe {
                    path: rel,
                    why: "a symbolic link is in the way of this directory; nothing is written through links"
                        .into(),
                })
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ArchiveError::Conflict {
                    path: rel,
                    why: "a file is in the way of this directory; remove it first".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path).map_err(io_error(&path))?;
            }
            Err(e) => return Err(io_error(&path)(e)),
        }
        self.summary.dirs += 1;
        Ok(())
    }

    fn link(&mut self, rel: PathBuf, target: &Path) -> Result<(), ArchiveError> {
        not_dest_itself(&rel)?;
        if let Err(why) = check_link_target(&rel, target) {
            return Err(ArchiveError::Unsafe { path: rel, why });
        }
        let path = self.parents(&rel)?;
        clear(&path, &rel)?;
        std::os::unix::fs::symlink(target, &path).map_err(io_error(&path))?;
        self.summary.links += 1;
        Ok(())
    }

    /// Makes sure every parent of `rel` inside `dest` is a real directory,
    /// creating missing ones, and returns the path to write.
    fn parents(&self, rel: &Path) -> Result<PathBuf, ArchiveError> {
        let components: Vec<_> = rel.components().collect();
        let mut path = self.dest.to_path_buf();
        for (i, c) in components
            .iter()
            .enumerate()
            .take(components.len().saturating_sub(1))
        {
            path.push(c);
            let parent = || components[..=i].iter().collect::<PathBuf>();
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ArchiveError::Unsafe {
                        path: rel.to_path_buf(),
                        why: format!(
                            "its parent {} is a symbolic link; nothing is written through links",
                            parent().display()
                        ),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ArchiveError::Conflict {
                        path: rel.to_path_buf(),
                        why: format!("its parent {} is not a directory", parent().display()),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path).map_err(io_error(&path))?;
                }
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        if let Some(last) = components.last() {
            path.push(last);
        }
        Ok(path)
    }
}

/// Removes a file or link at `path` so a new one can be created there.
fn clear(path: &Path, rel: &Path) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(ArchiveError::Conflict {
            path: rel.to_path_buf(),
            why: "a directory is in the way; remove it first".into(),
        }),
        Ok(_) => fs::remove_file(path).map_err(io_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn not_dest_itself(rel: &Path) -> Result<(), ArchiveError> {
    if rel.as_os_str().is_empty() {
        return Err(ArchiveError::Unsafe {
            path: PathBuf::from("."),
            why: "the entry names the destination directory itself".into(),
        });
    }
    Ok(())
}

/// Checks an entry name: relative, no `..`, no NUL. `.` components are
/// dropped; the empty result is the destination itself.
fn entry_name(raw: &[u8]) -> Result<PathBuf, ArchiveError> {
    let name = Path::new(OsStr::from_bytes(raw));
    let refuse = |why: &str| ArchiveError::Unsafe {
        path: name.to_path_buf(),
        why: why.into(),
    };
    if raw.contains(&0) {
        return Err(refuse("the name contains a NUL byte"));
    }
    let mut rel = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("the name has a '..' component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("the name is absolute"))
            }
        }
    }
    Ok(rel)
}

/// Lexical normalization of a path given to `pack`.
fn normalize(path: &Path) -> Result<PathBuf, &'static str> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !rel.pop() {
                    return Err("the path leaves the root; give paths inside it");
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("the path is absolute; give paths relative to the root")
            }
        }
    }
    Ok(rel)
}

/// Whether a link at `link` (a normalized relative path) may point at
/// `target`: relative, and staying inside the tree when read from the link's
/// directory, with `..` only at the start (see the module documentation).
fn check_link_target(link: &Path, target: &Path) -> Result<(), String> {
    if target.as_os_str().is_empty() {
        return Err("symbolic link with an empty target".into());
    }
    let outside = || format!("symbolic link pointing outside ({})", target.display());
    let mut depth = link.components().count().saturating_sub(1);
    let mut named = false;
    for c in target.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
            Component::CurDir => {}
            Component::ParentDir if named => {
                return Err(format!(
                    "symbolic link target {} has '..' after a name, which cannot be checked without following links",
                    target.display()
                ))
            }
            Component::ParentDir => depth = depth.checked_sub(1).ok_or_else(outside)?,
            Component::Normal(_) => named = true,
        }
    }
    Ok(())
}

fn kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "FIFO".into(),
        EntryType::GNUSparse => "GNU sparse file".into(),
        other => format!("entry type {:?}", char::from(other.as_byte())),
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bounds what the tar reader may take from the stream, and notices the end
/// of the stream.
#[derive(Default)]
struct Meter {
    /// Bytes the reader may still take: [`HEADER_BUDGET`] before each
    /// entry, the content size while a file's content is read.
    budget: Cell<u64>,
    exhausted: Cell<bool>,
    /// The stream ended. A well-formed archive stops at its zero block
    /// first and never gets here.
    eof: Cell<bool>,
}

impl Meter {
    fn error(&self, e: io::Error) -> ArchiveError {
        if self.exhausted.get() {
            ArchiveError::HeaderTooLarge {
                limit: HEADER_BUDGET,
            }
        } else {
            ArchiveError::Corrupt(e.to_string())
        }
    }
}

struct Metered<'m, R> {
    inner: R,
    meter: &'m Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let budget = self.meter.budget.get();
        if budget == 0 {
            self.meter.exhausted.set(true);
            return Err(io::Error::other("per-entry header budget exhausted"));
        }
        let want = buf.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.meter.eof.set(true);
        }
        self.meter.budget.set(budget.saturating_sub(n as u64));
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use proptest::sample::Index;

    const LIMITS: Limits = Limits {
        max_bytes: 16 << 20,
        max_entries: 10_000,
    };

    /// A destination that is the only thing inside its own temporary
    /// parent, so anything written outside it shows up in the parent.
    struct Dest {
        parent: tempfile::TempDir,
        dest: PathBuf,
    }

    impl Dest {
        fn new() -> Self {
            let parent = tempfile::tempdir().unwrap();
            let dest = parent.path().join("dest");
            fs::create_dir(&dest).unwrap();
            Self { parent, dest }
        }

        fn unpack(&self, bytes: &[u8]) -> Result<Summary, ArchiveError> {
            unpack(bytes, &self.dest, LIMITS)
        }

        fn assert_nothing_outside(&self) {
            let names: Vec<OsString> = fs::read_dir(self.parent.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![OsString::from("dest")]);
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Node {
        Dir,
        File(Vec<u8>, u32),
        Link(PathBuf),
        Other,
    }

    /// Everything under `root`, by relative path, without following links.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
        let mut out = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let rel = rel.join(e.file_name());
                let full = root.join(&rel);
                let meta = fs::symlink_metadata(&full).unwrap();
                let node = if meta.file_type().is_symlink() {
                    Node::Link(fs::read_link(&full).unwrap())
                } else if meta.is_dir() {
                    stack.push(rel.clone());
                    Node::Dir
                } else if meta.is_file() {
                    Node::File(fs::read(&full).unwrap(), meta.mode() & 0o7777)
                } else {
                    Node::Other
                };
                out.insert(rel, node);
            }
        }
        out
    }

    fn write(path: &Path, data: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn pack_vec(
        root: &Path,
        paths: &[&str],
        missing_ok: bool,
    ) -> Result<(Vec<u8>, Summary), ArchiveError> {
        let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
        let mut out = Vec::new();
        let summary = pack(root, &paths, missing_ok, &mut out)?;
        Ok((out, summary))
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(bytes)
            .entries()
            .unwrap()
            .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
            .collect()
    }

    fn long_path() -> String {
        let mut p = String::from("long");
        for c in ['a', 'b', 'c', 'd', 'e', 'f'] {
            p.push('/');
            p.extend(std::iter::repeat_n(c, 50));
        }
        p.push_str("/file.txt");
        assert!(p.len() > 300);
        p
    }

    /// The tree the round trip packs, with two links that must stay out.
    fn source_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::write(t.path().join("outside.txt"), b"secret").unwrap();
        write(&root.join("a/b/c/deep.txt"), b"deep\n", 0o644);
        write(&root.join("a/top.txt"), b"top\n", 0o600);
        let big: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        write(&root.join("a/big.bin"), &big, 0o644);
        fs::create_dir_all(root.join("empty")).unwrap();
        write(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
        write(&root.join("bin/setuid"), b"x", 0o4775);
        write(
            &root.join("spaced ü 文件 name.txt"),
            "ünïcode".as_bytes(),
            0o644,
        );
        write(&root.join(long_path()), b"far down", 0o644);
        fs::create_dir_all(root.join("links")).unwrap();
        symlink("../a/b/c/deep.txt", root.join("links/in")).unwrap();
        symlink("../a", root.join("links/dir")).unwrap();
        symlink(format!("../{}", long_path()), root.join("links/long")).unwrap();
        symlink("../../outside.txt", root.join("links/out")).unwrap();
        symlink("/etc/passwd", root.join("links/abs")).unwrap();
        symlink("x/../../..", root.join("links/sneaky")).unwrap();
        std::os::unix::net::UnixListener::bind(root.join("links/sock")).unwrap();
        t
    }

    #[test]
    fn round_trip_keeps_contents_modes_and_in_tree_links() {
        let t = source_tree();
        let root = t.path().join("root");
        let paths = [
            "a",
            "a/b",
            "./a/../a/top.txt",
            "empty",
            "bin",
            "spaced ü 文件 name.txt",
            "long",
            "links",
            "target/app",
        ];
        let (bytes, packed) = pack_vec(&root, &paths, true).unwrap();

        let names = names(&bytes);
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicate entries: {names:?}");
        assert!(names.iter().all(|n| !n.starts_with("./")), "{names:?}");

        let mut skipped = packed.skipped.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            vec![
                "links/abs: symbolic link pointing outside (/etc/passwd)".to_string(),
                "links/out: symbolic link pointing outside (../../outside.txt)".to_string(),
                "links/sneaky: symbolic link target x/../../.. has '..' after a name, \
                 which cannot be checked without following links"
                    .to_string(),
                "links/sock: socket, not packed".to_string(),
                "target/app: not found".to_string(),
            ]
        );
        assert_eq!(packed.links, 3);

        let d = Dest::new();
        let unpacked = d.unpack(&bytes).unwrap();
        d.assert_nothing_outside();
        assert_eq!(
            (
                unpacked.files,
                unpacked.dirs,
                unpacked.links,
                unpacked.bytes
            ),
            (packed.files, packed.dirs, packed.links, packed.bytes)
        );
        assert!(unpacked.skipped.is_empty());

        let mut expected = snapshot(&root);
        for gone in ["links/abs", "links/out", "links/sneaky", "links/sock"] {
            assert!(expected.remove(Path::new(gone)).is_some());
        }
        // setuid never survives; the executable bits do.
        expected.insert("bin/setuid".into(), Node::File(b"x".to_vec(), 0o755));
        assert_eq!(snapshot(&d.dest), expected);
        assert_eq!(
            fs::metadata(d.dest.join("bin/run.sh")).unwrap().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            fs::read_link(d.dest.join("links/in")).unwrap(),
            Path::new("../a/b/c/deep.txt")
        );
        assert_eq!(fs::read(d.dest.join("links/long")).unwrap(), b"far down");
        assert_eq!(
            fs::metadata(d.dest.join("a/b/c/deep.txt")).unwrap().mtime(),
            fs::metadata(root.join("a/b/c/deep.txt")).unwrap().mtime()
        );

        let (again, _) = pack_vec(&root, &paths, true).unwrap();
        assert!(again == bytes, "packing is not deterministic");
    }

    #[test]
    fn pack_missing_path_is_an_error_unless_allowed() {
        let t = source_tree();
        let root = t.path().join("root");
        let err = pack_vec(&root, &["a", "target/app"], false).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::NotFound { path } if path.ends_with("target/app")),
            "{err}"
        );
        // Under a file is missing too.
        let err = pack_vec(&root, &["a/top.txt/x"], false).unwrap_err();
        assert!(matches!(err, ArchiveError::NotFound { .. }), "{err}");
    }

    #[test]
    fn failed_pack_leaves_the_archive_unended() {
        let t = source_tree();
        let root = t.path().join("root");
        let mut out = Vec::new();
        let paths = [PathBuf::from("a"), PathBuf::from("nope")];
        assert!(pack(&root, &paths, false, &mut out).is_err());
        assert!(!out.is_empty());
        let d = Dest::new();
        let err = d.unpack(&out).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt(_)), "{err}");
    }

    #[test]
    fn pack_normalizes_names_and_refuses_leaving_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(&root.join("b/f"), b"f", 0o644);
        write(&root.join("a/g"), b"g", 0o644);
        let (bytes, _) = pack_vec(root, &["a/../b", "./b/f"], false).unwrap();
        assert_eq!(names(&bytes), vec!["b", "b/f"]);

        let err = pack_vec(root, &["../x"], true).unwrap_err();
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        let err = pack_vec(root, &["a/../../x"], true).unwrap_err();
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        let err = pack_vec(root, &["/etc"], true).unwrap_err();
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");

        // The whole root, with no entry for the root itself.
        let (bytes, _) = pack_vec(root, &["."], false).unwrap();
        assert_eq!(names(&bytes), vec!["a", "a/g", "b", "b/f"]);
    }

    #[test]
    fn pack_does_not_go_through_a_linked_parent() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        write(&t.path().join("elsewhere/secret"), b"s", 0o644);
        fs::create_dir(&root).unwrap();
        symlink(t.path().join("elsewhere"), root.join("dist")).unwrap();
        let (bytes, summary) = pack_vec(&root, &["dist/secret", "dist"], false).unwrap();
        assert!(names(&bytes).is_empty());
        assert_eq!(
            summary.skipped,
            vec![
                "dist/secret: path passes through the symbolic link dist".to_string(),
                format!(
                    "dist: symbolic link pointing outside ({})",
                    t.path().join("elsewhere").display()
                ),
            ]
        );
    }

    /// One raw entry, name and link name written straight into the header
    /// so that tar's own checks on `..` and absolute paths are bypassed.
    fn raw(out: &mut Vec<u8>, name: &[u8], kind: EntryType, data: &[u8], link: &[u8], mode: u32) {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn end(mut out: Vec<u8>) -> Vec<u8> {
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        raw(
            &mut out,
            name.as_bytes(),
            EntryType::Regular,
            data,
            b"",
            0o644,
        );
        out
    }

    fn link(name: &str, target: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        raw(
            &mut out,
            name.as_bytes(),
            EntryType::Symlink,
            b"",
            target,
            0o777,
        );
        out
    }

    fn refused(bytes: Vec<u8>) -> (Dest, ArchiveError) {
        let d = Dest::new();
        let err = d.unpack(&bytes).unwrap_err();
        d.assert_nothing_outside();
        (d, err)
    }

    #[test]
    fn unpack_refuses_parent_dir_names() {
        let (_, err) = refused(end(file("../evil", b"x")));
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        let (_, err) = refused(end(file("ok/../../evil", b"x")));
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
    }

    #[test]
    fn unpack_refuses_absolute_names() {
        let d = Dest::new();
        let target = d.parent.path().join("abs-evil");
        let err = d
            .unpack(&end(file(target.to_str().unwrap(), b"x")))
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        assert!(!target.exists());
        d.assert_nothing_outside();
    }

    #[test]
    fn unpack_refuses_hard_links() {
        let mut bytes = file("a", b"x");
        raw(&mut bytes, b"b", EntryType::Link, b"", b"a", 0o644);
        let (d, err) = refused(end(bytes));
        assert!(
            matches!(&err, ArchiveError::Unsafe { why, .. } if why.contains("hard link")),
            "{err}"
        );
        assert!(!d.dest.join("b").exists());

        let mut bytes = Vec::new();
        raw(
            &mut bytes,
            b"passwd",
            EntryType::Link,
            b"",
            b"/etc/passwd",
            0o644,
        );
        let (_, err) = refused(end(bytes));
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
    }

    #[test]
    fn unpack_refuses_devices_and_fifos() {
        for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
            let mut bytes = Vec::new();
            raw(&mut bytes, b"dev", kind, b"", b"", 0o666);
            let (d, err) = refused(end(bytes));
            assert!(matches!(err, ArchiveError::Unsupported { .. }), "{err}");
            assert!(fs::symlink_metadata(d.dest.join("dev")).is_err());
        }
    }

    #[test]
    fn unpack_refuses_absolute_link_and_never_writes_through_it() {
        // The file name is a canary, not "passwd": if this ever regressed
        // under root in CI, it must not clobber a real file.
        let mut bytes = link("link", b"/etc");
        bytes.extend(file("link/tern-archive-test-canary", b"pwned"));
        let (d, err) = refused(end(bytes));
        assert!(
            matches!(&err, ArchiveError::Unsafe { why, .. } if why.contains("outside")),
            "{err}"
        );
        assert!(fs::symlink_metadata(d.dest.join("link")).is_err());
        assert!(!Path::new("/etc/tern-archive-test-canary").exists());
    }

    #[test]
    fn unpack_refuses_links_leaving_dest() {
        for (name, target) in [
            ("l", &b"../.."[..]),
            ("l", b".."),
            ("sub/l", b"../../x"),
            ("l", b"sub/../../x"),
            ("l", b""),
        ] {
            let (d, err) = refused(end(link(name, target)));
            assert!(
                matches!(err, ArchiveError::Unsafe { .. }),
                "{name} -> {target:?}: {err}"
            );
            assert!(fs::symlink_metadata(d.dest.join(name)).is_err());
        }
        // A link to dest itself is fine, but '..' after it is not.
        let mut bytes = link("here", b".");
        bytes.extend(link("up", b"here/.."));
        let (d, err) = refused(end(bytes));
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        assert!(fs::symlink_metadata(d.dest.join("here"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(d.dest.join("up")).is_err());
    }

    #[test]
    fn unpack_never_writes_through_an_in_tree_link() {
        let mut bytes = Vec::new();
        raw(&mut bytes, b"sub", EntryType::Directory, b"", b"", 0o755);
        bytes.extend(link("l", b"sub"));
        bytes.extend(file("l/x", b"x"));
        let (d, err) = refused(end(bytes));
        assert!(
            matches!(&err, ArchiveError::Unsafe { why, .. } if why.contains("symbolic link")),
            "{err}"
        );
        assert!(!d.dest.join("sub/x").exists());
    }

    #[test]
    fn unpack_never_writes_through_an_existing_link() {
        let outside = tempfile::tempdir().unwrap();
        let d = Dest::new();
        symlink(outside.path(), d.dest.join("evil")).unwrap();
        for bytes in [
            end(file("evil/x", b"x")),
            {
                let mut b = Vec::new();
                raw(&mut b, b"evil/dir", EntryType::Directory, b"", b"", 0o755);
                end(b)
            },
            end(link("evil/l", b"y")),
        ] {
            let err = d.unpack(&bytes).unwrap_err();
            assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err}");
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // A link at the entry's own path is replaced, not followed.
        d.unpack(&end(file("evil", b"now a file"))).unwrap();
        assert_eq!(fs::read(d.dest.join("evil")).unwrap(), b"now a file");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        d.assert_nothing_outside();
    }

    #[test]
    fn unpack_enforces_limits() {
        let mut bytes = file("a", &[1; 600]);
        bytes.extend(file("b", &[2; 600]));
        let bytes = end(bytes);
        let d = Dest::new();
        let limits = Limits {
            max_bytes: 1000,
            max_entries: 100,
        };
        let err = unpack(&bytes[..], &d.dest, limits).unwrap_err();
        assert!(
            matches!(err, ArchiveError::TooLarge { limit: 1000 }),
            "{err}"
        );
        assert!(!d.dest.join("b").exists());
        d.assert_nothing_outside();

        let d = Dest::new();
        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 1,
        };
        let err = unpack(&bytes[..], &d.dest, limits).unwrap_err();
        assert!(
            matches!(err, ArchiveError::TooManyEntries { limit: 1 }),
            "{err}"
        );
        d.assert_nothing_outside();

        // A long name bigger than the header budget is refused before it
        // is buffered whole.
        let mut bytes = Vec::new();
        let huge = vec![b'a'; (HEADER_BUDGET + 1) as usize];
        raw(
            &mut bytes,
            b"././@LongLink",
            EntryType::GNULongName,
            &huge,
            b"",
            0o644,
        );
        bytes.extend(file("x", b"x"));
        let (_, err) = refused(end(bytes));
        assert!(matches!(err, ArchiveError::HeaderTooLarge { .. }), "{err}");
    }

    #[test]
    fn unpack_masks_modes_and_replaces_files() {
        let d = Dest::new();
        let mut bytes = Vec::new();
        raw(&mut bytes, b"f", EntryType::Regular, b"one", b"", 0o6777);
        d.unpack(&end(bytes)).unwrap();
        assert_eq!(
            fs::metadata(d.dest.join("f")).unwrap().mode() & 0o7777,
            0o755
        );
        d.unpack(&end(file("f", b"two"))).unwrap();
        assert_eq!(fs::read(d.dest.join("f")).unwrap(), b"two");
        assert_eq!(
            fs::metadata(d.dest.join("f")).unwrap().mode() & 0o7777,
            0o644
        );

        fs::create_dir(d.dest.join("dir")).unwrap();
        let err = d.unpack(&end(file("dir", b"x"))).unwrap_err();
        assert!(matches!(err, ArchiveError::Conflict { .. }), "{err}");
        let err = d.unpack(&end(file("f/under", b"x"))).unwrap_err();
        assert!(matches!(err, ArchiveError::Conflict { .. }), "{err}");
        d.assert_nothing_outside();
    }

    #[test]
    fn unpack_ignores_global_headers_and_dot() {
        let d = Dest::new();
        let mut bytes = Vec::new();
        raw(
            &mut bytes,
            b"pax_global_header",
            EntryType::XGlobalHeader,
            b"9 a=bcd\n",
            b"",
            0o644,
        );
        raw(&mut bytes, b"./", EntryType::Directory, b"", b"", 0o755);
        bytes.extend(file("./x", b"x"));
        let summary = d.unpack(&end(bytes)).unwrap();
        assert_eq!((summary.files, summary.dirs), (1, 0));
        assert_eq!(fs::read(d.dest.join("x")).unwrap(), b"x");
    }

    #[test]
    fn unpack_refuses_truncated_streams() {
        let bytes = end(file("f", &[7; 2000]));
        for cut in [0, 512, 1000, 512 + 2048] {
            let (_, err) = refused(bytes[..cut].to_vec());
            assert!(matches!(err, ArchiveError::Corrupt(_)), "cut {cut}: {err}");
        }
    }

    #[test]
    fn unpack_reads_nothing_past_the_archive() {
        let mut bytes = end(file("f", b"x"));
        bytes.extend_from_slice(b"TRAILER");
        let d = Dest::new();
        let mut source = &bytes[..];
        unpack(&mut source, &d.dest, LIMITS).unwrap();
        let mut rest = vec![0; 512];
        rest.extend_from_slice(b"TRAILER");
        assert_eq!(source, &rest[..]);
    }

    #[test]
    fn chunk_writer_cuts_and_chunk_reader_reassembles() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (tx, mut rx) = mpsc::channel(4);
        let input = data.clone();
        let writer = std::thread::spawn(move || {
            let mut w = ChunkWriter::new(tx, 7);
            for piece in input.chunks(13) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap();
        });
        let mut chunks = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            chunks.push(c);
        }
        writer.join().unwrap();
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= 7));
        assert_eq!(chunks.concat(), data);

        let (tx, rx) = mpsc::channel(4);
        let sender = std::thread::spawn(move || {
            for c in chunks {
                tx.blocking_send(Vec::new()).unwrap();
                tx.blocking_send(c).unwrap();
            }
        });
        let mut out = Vec::new();
        ChunkReader::new(rx).read_to_end(&mut out).unwrap();
        sender.join().unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn chunk_writer_to_a_dropped_receiver_is_a_broken_pipe() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = ChunkWriter::new(tx, 7);
        let err = w.write_all(&[0; 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);

        let (tx, rx) = mpsc::channel(1);
        let mut w = ChunkWriter::new(tx, 7);
        w.write_all(&[0; 3]).unwrap();
        drop(rx);
        assert_eq!(w.finish().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn pack_and_unpack_over_channels() {
        let t = source_tree();
        let root = t.path().join("root");
        let (tx, rx) = mpsc::channel(8);
        let packer = std::thread::spawn(move || {
            pack(
                &root,
                &[PathBuf::from("a")],
                false,
                ChunkWriter::new(tx, 1000),
            )
        });
        let d = Dest::new();
        let mut reader = ChunkReader::new(rx);
        let summary = unpack(&mut reader, &d.dest, LIMITS).unwrap();
        // Unpacking stops at the end-of-archive marker; the rest of the
        // stream (the second zero block) is read here, as the shells do by
        // keeping their side of the channel open, or the packer could find
        // its last write refused.
        std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
        assert_eq!(packer.join().unwrap().unwrap(), summary);
        assert_eq!(
            snapshot(&d.dest.join("a")),
            snapshot(&t.path().join("root/a"))
        );
    }

    /// A small valid archive with a long name, a link and a directory, and
    /// where each of its headers starts.
    fn sample() -> &'static (Vec<u8>, Vec<usize>) {
        static SAMPLE: OnceLock<(Vec<u8>, Vec<usize>)> = OnceLock::new();
        SAMPLE.get_or_init(|| {
            let t = tempfile::tempdir().unwrap();
            let root = t.path();
            write(&root.join("d/f.txt"), b"hello", 0o644);
            write(
                &root.join(format!("d/{}", "n".repeat(120))),
                &[9; 700],
                0o755,
            );
            fs::create_dir(root.join("e")).unwrap();
            symlink("d/f.txt", root.join("l")).unwrap();
            let (bytes, _) = pack_vec(root, &["."], false).unwrap();
            let mut archive = tar::Archive::new(&bytes[..]);
            let headers = archive
                .entries()
                .unwrap()
                .raw(true)
                .map(|e| e.unwrap().raw_header_position() as usize)
                .collect();
            (bytes, headers)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn unpack_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let d = Dest::new();
            let _ = d.unpack(&bytes);
            d.assert_nothing_outside();
        }

        #[test]
        fn unpack_survives_mutated_archives(
            flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
            cut in proptest::option::of(any::<Index>()),
            fix_checksums in any::<bool>(),
        ) {
            let (original, headers) = sample();
            let mut bytes = original.clone();
            for (at, value) in &flips {
                let i = at.index(bytes.len());
                bytes[i] = *value;
            }
            if fix_checksums {
                // Let the mutation get past the checksum into the parser.
                for &at in headers {
                    let mut h = Header::new_old();
                    h.as_mut_bytes().copy_from_slice(&bytes[at..at + 512]);
                    h.set_cksum();
                    bytes[at..at + 512].copy_from_slice(h.as_bytes());
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let d = Dest::new();
            let _ = d.unpack(&bytes);
            d.assert_nothing_outside();
        }
    }
}
