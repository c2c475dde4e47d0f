//! Pipeline files for the runner: what `tern run` sends and a runner executes.
//!
//! A pipeline is a TOML file (see the annotated `config/pipeline.toml`, which
//! documents every key and is parsed by a test here so it never rots):
//! top-level `name`, `timeout`, `env`, `upload`, `artifacts`, and one
//! `[[steps]]` table per step with `name`, `run`, `shell`, `env`, `timeout`,
//! `working_directory` and `continue_on_error`.
//!
//! How to drive it:
//! - On the CI side, read the file and hand its text and path to
//!   [`Pipeline::parse`]: it rejects unknown keys and bad values with
//!   `file:line:col`, the key and the fix, before anything is sent. Then call
//!   [`Pipeline::check_uploads`] with the CI workspace (the one function here
//!   that touches the filesystem).
//! - Send the [`Pipeline`] over the wire with serde (e.g. as JSON). Durations
//!   are serialized as the same strings the file uses (`"1h30m"`), so the wire
//!   form has the file's key names and shapes.
//! - On the runner, deserialize and call [`Pipeline::validate`]: the same rules
//!   as `parse`, without positions, since the runner must not trust the sender
//!   to have checked (a path escaping the job workspace above all).
//!
//! Apart from `check_uploads`, this module does no IO: the file path given to
//! `parse` is only used to name the file in errors.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use tern_shared::duration::format_duration;
use tern_shared::toml_error::{position, Mistake, Place, Position, TomlError};

/// Default pipeline `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest accepted pipeline or step `timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default step `shell`: the script fails on the first failing command,
/// including inside a pipe.
pub const DEFAULT_SHELL: &str = "bash -eo pipefail";
/// Longest pipeline `name`, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Most `[[steps]]` in one pipeline.
pub const MAX_STEPS: usize = 256;
/// Most variables in one `env` table (the pipeline's or a step's).
pub const MAX_ENV_VARS: usize = 256;
/// Most `upload` entries.
pub const MAX_UPLOADS: usize = 64;
/// Most `artifacts` entries.
pub const MAX_ARTIFACTS: usize = 64;
/// Prefix of the environment variables the runner sets itself; pipelines may
/// not set them.
pub const RESERVED_ENV_PREFIX: &str = "TERN_";

/// A parsed and validated pipeline. The same type is the wire form: build it
/// with [`Pipeline::parse`] from a file, or deserialize it and call
/// [`Pipeline::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Shown in logs and job lists. Required; 1 to [`MAX_NAME_LEN`]
    /// characters, no control characters.
    pub name: String,
    /// The whole job is stopped after this long. Positive, at most
    /// [`MAX_TIMEOUT`]. Default [`DEFAULT_TIMEOUT`].
    #[serde(
        default = "default_timeout",
        deserialize_with = "tern_shared::config::duration",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Duration,
    /// Environment for every step (a step's own `env` wins on conflicts).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Paths in the CI workspace copied into the runner's job workspace (same
    /// relative path) before the first step.
    #[serde(default)]
    pub upload: Vec<PathBuf>,
    /// Paths in the job workspace copied back to the CI workspace after the
    /// job.
    #[serde(default)]
    pub artifacts: Vec<PathBuf>,
    /// Run in order. At least one, at most [`MAX_STEPS`].
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One `[[steps]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the pipeline, no control characters. Required.
    pub name: String,
    /// The script, run by `shell`. Required, not empty.
    pub run: String,
    /// The shell that runs `run`: a program and its arguments. Default
    /// [`DEFAULT_SHELL`].
    #[serde(default = "default_shell")]
    pub shell: String,
    /// Extra environment for this step, over the pipeline's `env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The step is stopped after this long. Positive, at most
    /// [`MAX_TIMEOUT`]. Default: only the pipeline's `timeout` applies.
    #[serde(
        default,
        deserialize_with = "optional_duration",
        serialize_with = "serialize_optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Directory the step runs in, relative to the job workspace and inside
    /// it. Default: the job workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<PathBuf>,
    /// When true, a failing step is reported but the next steps still run.
    /// Default false.
    #[serde(default)]
    pub continue_on_error: bool,
}

/// Why a pipeline was refused. Each variant names the key and says what to
/// change; variants from a file also name it and, where it can be told, the
/// position (`file:line:col`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The text is not valid TOML, or has an error not tied to one key.
    #[error("{}: invalid TOML: {message}", Place { file, at, unnamed: "pipeline" })]
    Syntax {
        file: PathBuf,
        at: Option<Position>,
        message: String,
    },
    /// A key the pipeline format does not know (often a typo).
    #[error(
        "{}: unknown key `{key}` ({expected}); remove it or correct its spelling",
        Place { file, at, unnamed: "pipeline" }
    )]
    UnknownKey {
        file: PathBuf,
        at: Option<Position>,
        /// Path of the key, e.g. `steps[1].nmae`.
        key: String,
        /// What serde expected instead, e.g. "expected one of `name`, `run`, …".
        expected: String,
    },
    /// A required key is absent. `at` points at the table that lacks it.
    #[error(
        "{}: missing required key `{key}`; add it, e.g. {}",
        Place { file, at, unnamed: "pipeline" },
        missing_example(key)
    )]
    Missing {
        file: PathBuf,
        at: Option<Position>,
        key: String,
    },
    /// A key has a value of the wrong type or form (e.g. a bad duration).
    #[error("{}: bad value for `{key}`: {message}", Place { file, at, unnamed: "pipeline" })]
    BadValue {
        file: PathBuf,
        at: Option<Position>,
        key: String,
        message: String,
    },
    /// The value is well-formed but breaks a rule.
    #[error("{}: invalid `{key}`: {message}", Place { file, at, unnamed: "pipeline" })]
    Invalid {
        file: PathBuf,
        at: Option<Position>,
        key: String,
        message: String,
    },
    /// From [`Pipeline::check_uploads`]: an `upload` entry is not in the CI
    /// workspace.
    #[error(
        "`{key}`: {} does not exist in the CI workspace {}; create it in an earlier \
         CI step, correct the path, or remove it from `upload`",
        path.display(),
        workspace.display()
    )]
    UploadMissing {
        /// e.g. `upload[2]`.
        key: String,
        /// The entry as written in the pipeline.
        path: PathBuf,
        workspace: PathBuf,
    },
    /// From [`Pipeline::check_uploads`]: an `upload` entry exists but cannot
    /// be used (unreadable, or a symbolic link out of the workspace).
    #[error("`{key}`: {}: {message}", path.display())]
    UploadUnusable {
        key: String,
        path: PathBuf,
        message: String,
    },
    /// From [`Pipeline::check_uploads`]: the CI workspace itself is unusable.
    #[error("CI workspace {}: {message}; run from the CI job's checkout", path.display())]
    Workspace { path: PathBuf, message: String },
}

impl Pipeline {
    /// Parses and validates a pipeline file. `file` is the path the text was
    /// read from, used only to name it in errors; it is never read.
    pub fn parse(text: &str, file: &Path) -> Result<Pipeline, PipelineError> {
        // The strict parse checks shapes and keys; a second, lenient pass over
        // the same text records where each value is, to put positions on
        // errors. Both are cheap next to running a job.
        let parsed: Result<Pipeline, _> = toml::from_str(text);
        let spans = Spans::parse(text);
        match parsed {
            Ok(pipeline) => {
                pipeline.check(file, &spans)?;
                Ok(pipeline)
            }
            Err(err) => Err(classify(file, &spans, &err)),
        }
    }

    /// Checks a pipeline that did not come from [`Pipeline::parse`], e.g. one
    /// deserialized from the wire, against the same rules. Errors carry no
    /// file or position (they print as `pipeline: …`).
    pub fn validate(&self) -> Result<(), PipelineError> {
        self.check(Path::new(""), &Spans::none())
    }

    fn check(&self, file: &Path, spans: &Spans<'_>) -> Result<(), PipelineError> {
        let cx = Cx { file, spans };
        let name = &self.name;
        if name.trim().is_empty() {
            return Err(cx.invalid(
                &[Key("name")],
                "the name is empty; name the pipeline, e.g. name = \"build and test\"",
            ));
        }
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(cx.invalid(
                &[Key("name")],
                format!("the name has {len} characters; shorten it to at most {MAX_NAME_LEN}"),
            ));
        }
        if let Some(c) = name.chars().find(|c| c.is_control()) {
            return Err(cx.invalid(
                &[Key("name")],
                format!(
                    "the name contains the control character {c:?}; use printable characters only"
                ),
            ));
        }
        check_timeout(&cx, &[Key("timeout")], self.timeout)?;
        check_env(&cx, &[Key("env")], &self.env)?;
        for (key, paths, max, workspace) in [
            ("upload", &self.upload, MAX_UPLOADS, "CI workspace"),
            ("artifacts", &self.artifacts, MAX_ARTIFACTS, "job workspace"),
        ] {
            if paths.len() > max {
                return Err(cx.invalid(
                    &[Key(key), Index(max)],
                    format!(
                        "`{key}` has {} entries, at most {max} are allowed; list a parent \
                         directory instead of its files",
                        paths.len()
                    ),
                ));
            }
            for (i, path) in paths.iter().enumerate() {
                check_path(path, workspace).map_err(|m| cx.invalid(&[Key(key), Index(i)], m))?;
            }
        }

        if self.steps.is_empty() {
            return Err(cx.invalid(
                &[Key("steps")],
                "the pipeline has no steps; add at least one [[steps]] table with `name` and `run`",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(cx.invalid(
                &[Key("steps"), Index(MAX_STEPS)],
                format!(
                    "the pipeline has {} steps, at most {MAX_STEPS} are allowed; merge steps \
                     or split the pipeline",
                    self.steps.len()
                ),
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            step.check(&cx, i)?;
            if let Some(first) = self.steps[..i].iter().position(|s| s.name == step.name) {
                return Err(cx.invalid(
                    &[Key("steps"), Index(i), Key("name")],
                    format!(
                        "{:?} is also the name of steps[{first}]; step names must be unique, \
                         rename one",
                        step.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Step {
    fn check(&self, cx: &Cx<'_>, i: usize) -> Result<(), PipelineError> {
        let at = |key: &'static str| [Key("steps"), Index(i), Key(key)];
        if self.name.trim().is_empty() {
            return Err(cx.invalid(
                &at("name"),
                "the step name is empty; name the step, e.g. name = \"test\"",
            ));
        }
        if let Some(c) = self.name.chars().find(|c| c.is_control()) {
            return Err(cx.invalid(
                &at("name"),
                format!("the step name contains the control character {c:?}; use printable characters only"),
            ));
        }
        if self.run.trim().is_empty() {
            return Err(cx.invalid(
                &at("run"),
                "the script is empty; write the commands to run, e.g. run = \"make test\"",
            ));
        }
        if self.shell.trim().is_empty() {
            return Err(cx.invalid(
                &at("shell"),
                format!(
                    "the shell is empty; remove the key for the default {DEFAULT_SHELL:?}, \
                     or name one, e.g. shell = \"sh -e\""
                ),
            ));
        }
        check_env(cx, &[Key("steps"), Index(i), Key("env")], &self.env)?;
        if let Some(timeout) = self.timeout {
            check_timeout(cx, &at("timeout"), timeout)?;
        }
        if let Some(dir) = &self.working_directory {
            check_path(dir, "job workspace")
                .map_err(|m| cx.invalid(&at("working_directory"), m))?;
        }
        Ok(())
    }
}

impl PipelineError {
    /// The error as `tern run` prints it: errors from
    /// [`Pipeline::check_uploads`] (which sees no text) get the `file:line:col`
    /// of their `upload` entry in `text` in front.
    pub fn located(&self, file: &Path, text: &str) -> String {
        let key = match self {
            PipelineError::UploadMissing { key, .. }
            | PipelineError::UploadUnusable { key, .. } => key,
            _ => return self.to_string(),
        };
        let index = key
            .strip_prefix("upload[")
            .and_then(|k| k.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok());
        let spans = Spans::parse(text);
        let at = index.and_then(|i| spans.at(&[Key("upload"), Index(i)]));
        let place = Place {
            file: &file.to_path_buf(),
            at: &at,
            unnamed: "pipeline",
        };
        format!("{place}: {self}")
    }
}

// --- The one function that reads the filesystem ---------------------------

impl Pipeline {
    /// Checks that every `upload` entry exists under `ci_workspace` and does
    /// not lead out of it through a symbolic link.
    ///
    /// **This reads the filesystem** (it resolves each path with
    /// [`std::fs::canonicalize`]); it is the only IO in this module. Call it
    /// on the CI side after [`Pipeline::parse`], before sending: entries are
    /// assumed already validated as relative paths inside the workspace.
    /// Symbolic links *inside* an uploaded directory are for the copier to
    /// handle.
    pub fn check_uploads(&self, ci_workspace: &Path) -> Result<(), PipelineError> {
        let base = std::fs::canonicalize(ci_workspace).map_err(|err| PipelineError::Workspace {
            path: ci_workspace.to_path_buf(),
            message: err.to_string(),
        })?;
        for (i, path) in self.upload.iter().enumerate() {
            let key = format!("upload[{i}]");
            let full = ci_workspace.join(path);
            match std::fs::canonicalize(&full) {
                Ok(real) if real.starts_with(&base) => {}
                Ok(real) => {
                    return Err(PipelineError::UploadUnusable {
                        key,
                        path: path.clone(),
                        message: format!(
                            "resolves to {} outside the CI workspace {} (through a symbolic \
                             link); upload the files themselves, or a path inside the workspace",
                            real.display(),
                            base.display()
                        ),
                    })
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    return Err(PipelineError::UploadMissing {
                        key,
                        path: path.clone(),
                        workspace: ci_workspace.to_path_buf(),
                    })
                }
                Err(err) => {
                    return Err(PipelineError::UploadUnusable {
                        key,
                        path: path.clone(),
                        message: format!(
                            "cannot be read in {}: {err}; fix its permissions",
                            ci_workspace.display()
                        ),
                    })
                }
            }
        }
        Ok(())
    }
}

// --- Validation helpers ---------------------------------------------------

/// A step in a key path: `steps[2].env.FOO` is
/// `[Key("steps"), Index(2), Key("env"), Key("FOO")]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}
use Seg::{Index, Key};

/// Where errors go: the file and, when parsing a file, the value positions.
struct Cx<'a> {
    file: &'a Path,
    spans: &'a Spans<'a>,
}

impl Cx<'_> {
    fn invalid(&self, path: &[Seg<'_>], message: impl Into<String>) -> PipelineError {
        PipelineError::Invalid {
            file: self.file.to_path_buf(),
            at: self.spans.at(path),
            key: key_string(path),
            message: message.into(),
        }
    }
}

fn check_timeout(cx: &Cx<'_>, path: &[Seg<'_>], timeout: Duration) -> Result<(), PipelineError> {
    if timeout.is_zero() {
        return Err(cx.invalid(
            path,
            format!(
                "the timeout must be longer than zero, e.g. \"30m\" (the pipeline's default is {})",
                format_duration(DEFAULT_TIMEOUT)
            ),
        ));
    }
    if timeout > MAX_TIMEOUT {
        return Err(cx.invalid(
            path,
            format!(
                "{} is longer than the limit of {}; use at most \"{}\"",
                format_duration(timeout),
                format_duration(MAX_TIMEOUT),
                format_duration(MAX_TIMEOUT)
            ),
        ));
    }
    Ok(())
}

fn check_env(
    cx: &Cx<'_>,
    path: &[Seg<'_>],
    env: &BTreeMap<String, String>,
) -> Result<(), PipelineError> {
    if env.len() > MAX_ENV_VARS {
        return Err(cx.invalid(
            path,
            format!(
                "{} variables, at most {MAX_ENV_VARS} are allowed; remove some or put them \
                 in a file the script reads",
                env.len()
            ),
        ));
    }
    for (name, value) in env {
        let mut var = path.to_vec();
        var.push(Key(name));
        if !is_env_name(name) {
            return Err(cx.invalid(
                &var,
                format!(
                    "{name:?} is not a valid variable name; use letters, digits and '_', \
                     not starting with a digit, e.g. BUILD_MODE"
                ),
            ));
        }
        if name.starts_with(RESERVED_ENV_PREFIX) {
            return Err(cx.invalid(
                &var,
                format!(
                    "names starting with {RESERVED_ENV_PREFIX} are reserved for the variables \
                     the runner sets; rename it, e.g. {}",
                    name.trim_start_matches(RESERVED_ENV_PREFIX)
                ),
            ));
        }
        if value.contains('\0') {
            return Err(cx.invalid(
                &var,
                "the value contains a NUL character, which an environment variable cannot hold; \
                 remove it",
            ));
        }
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Accepts a relative path that, read lexically (no filesystem), stays inside
/// the workspace: `a/../b` is fine, `../x` and `a/../../x` are not. Returns
/// the message for the error otherwise.
fn check_path(path: &Path, workspace: &str) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err(format!(
            "the path is empty; give a path relative to the {workspace}, e.g. \"build\""
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("the path contains a NUL character; remove it".to_string());
    }
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                let relative: PathBuf = path
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect();
                return Err(format!(
                    "{} is absolute; give a path relative to the {workspace}, e.g. {:?}",
                    path.display(),
                    relative.display().to_string()
                ));
            }
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    format!(
                        "{} leads out of the {workspace} (a `..` goes above its top); \
                         give a path inside it",
                        path.display()
                    )
                })?;
            }
            Component::Normal(_) => depth += 1,
        }
    }
    Ok(())
}

fn key_string(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if is_bare_key(k) {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "{k:?}");
                }
            }
            Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

fn is_bare_key(part: &str) -> bool {
    !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// An example line for a missing required key, for the error message.
fn missing_example(key: &str) -> &'static str {
    if key == "name" {
        "name = \"build and test\""
    } else if key.ends_with(".name") {
        "name = \"test\" in that [[steps]] table"
    } else if key.ends_with(".run") {
        "run = \"make test\" in that [[steps]] table"
    } else {
        "the key with a value"
    }
}

// --- Serde helpers ----------------------------------------------------------

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_shell() -> String {
    DEFAULT_SHELL.to_string()
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn serialize_optional_duration<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

/// An optional duration string; `null` (from JSON) is `None`.
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct OptionalDuration;

    impl<'de> Visitor<'de> for OptionalDuration {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"90s\", \"30m\" or \"1h30m\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            tern_shared::duration::parse_duration(s)
                .map(Some)
                .map_err(E::custom)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            tern_shared::config::duration(d).map(Some)
        }
    }

    d.deserialize_option(OptionalDuration)
}

// --- Errors from toml and positions -----------------------------------------
//
// Small helpers in the spirit of those in `config.rs` (private there). Rather
// than guessing keys from the lines of the text, which a `run` script full of
// `[ -f x ]` lines would fool, positions come from a lenient second parse that
// records the span of every value.

/// Turns toml's error into a [`PipelineError`] naming the key where the
/// error's position falls inside a known value.
fn classify(file: &Path, spans: &Spans<'_>, err: &toml::de::Error) -> PipelineError {
    let file = file.to_path_buf();
    let err = TomlError::read(err);
    let at = err.at(spans.text);
    let TomlError {
        message,
        span,
        mistake,
    } = err;
    match mistake {
        Mistake::UnknownKey { name, expected } => {
            let mut path = span.map(|s| spans.path_at(s.start)).unwrap_or_default();
            // The offset may fall inside the unknown key's own table
            // (`[steps.extra]`); do not name it twice.
            if path.last() != Some(&Key(&name)) {
                path.push(Key(&name));
            }
            return PipelineError::UnknownKey {
                file,
                at,
                key: key_string(&path),
                expected,
            };
        }
        Mistake::Missing { name } => {
            // toml points a missing field at the table that lacks it, or at an
            // empty span for the top level.
            let table = span.filter(|s| !s.is_empty());
            let mut path = table
                .as_ref()
                .map(|s| spans.path_at(s.start))
                .unwrap_or_default();
            // A key missing at the top level has no line to point at.
            let at = if path.is_empty() {
                None
            } else {
                table.map(|s| position(spans.text, s.start))
            };
            path.push(Key(&name));
            return PipelineError::Missing {
                file,
                at,
                key: key_string(&path),
            };
        }
        Mistake::BadValue => {
            let path = span.map(|s| spans.path_at(s.start)).unwrap_or_default();
            if !path.is_empty() {
                let key = key_string(&path);
                let mut message = message;
                let top = path.first().copied();
                if message.ends_with("expected a sequence") {
                    if top == Some(Key("steps")) {
                        message.push_str("; write each step as [[steps]] (double brackets)");
                    } else {
                        message.push_str(&format!("; write a list, e.g. {key} = [\"dist\"]"));
                    }
                } else if message.ends_with("expected a string") {
                    message.push_str("; put the value in double quotes");
                } else if message.ends_with("expected a boolean") {
                    message.push_str("; write true or false");
                } else if message.ends_with("expected a map") {
                    message.push_str("; write a table, e.g. env = { KEY = \"value\" }");
                }
                return PipelineError::BadValue {
                    file,
                    at,
                    key,
                    message,
                };
            }
        }
        Mistake::Syntax => {}
    }
    PipelineError::Syntax { file, at, message }
}

/// Where each value of a TOML text is, from a lenient parse that accepts any
/// keys and types. Empty when the text is not TOML at all, or for pipelines
/// that did not come from a file.
struct Spans<'t> {
    text: &'t str,
    root: Option<Kids>,
}

/// A value's span and, for tables and arrays, its children.
struct Node {
    span: Range<usize>,
    kids: Kids,
}

enum Kids {
    Leaf,
    Table(Vec<(String, Node)>),
    Array(Vec<Node>),
}

impl<'t> Spans<'t> {
    fn parse(text: &'t str) -> Spans<'t> {
        Spans {
            text,
            root: toml::from_str::<Kids>(text).ok(),
        }
    }

    fn none() -> Spans<'static> {
        Spans {
            text: "",
            root: None,
        }
    }

    /// Position of the value at `path`.
    fn at(&self, path: &[Seg<'_>]) -> Option<Position> {
        let mut kids = self.root.as_ref()?;
        let mut span = None;
        for seg in path {
            let node = match (seg, kids) {
                (Key(k), Kids::Table(entries)) => &entries.iter().find(|(name, _)| name == k)?.1,
                (Index(i), Kids::Array(items)) => items.get(*i)?,
                _ => return None,
            };
            span = Some(node.span.start);
            kids = &node.kids;
        }
        span.map(|offset| position(self.text, offset))
    }

    /// The path of the innermost value whose span holds byte `offset`.
    fn path_at(&self, offset: usize) -> Vec<Seg<'_>> {
        fn walk<'a>(kids: &'a Kids, offset: usize, path: &mut Vec<Seg<'a>>) -> bool {
            let children: Box<dyn Iterator<Item = (Seg<'a>, &'a Node)>> = match kids {
                Kids::Leaf => return false,
                Kids::Table(entries) => Box::new(entries.iter().map(|(k, n)| (Key(k.as_str()), n))),
                Kids::Array(items) => {
                    Box::new(items.iter().enumerate().map(|(i, n)| (Index(i), n)))
                }
            };
            for (seg, node) in children {
                path.push(seg);
                // Children are searched even outside their parent's span: a
                // `[steps.env]` table lies after its step's own span.
                if walk(&node.kids, offset, path) || node.span.contains(&offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        if let Some(root) = &self.root {
            walk(root, offset, &mut path);
        }
        path
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<Kids>::deserialize(d)?;
        Ok(Node {
            span: spanned.span(),
            kids: spanned.into_inner(),
        })
    }
}

impl<'de> Deserialize<'de> for Kids {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KidsVisitor;

        impl<'de> Visitor<'de> for KidsVisitor {
            type Value = Kids;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Kids, E> {
                Ok(Kids::Leaf)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kids, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    entries.push((key, map.next_value::<Node>()?));
                }
                Ok(Kids::Table(entries))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kids, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Kids::Array(items))
            }
        }

        d.deserialize_any(KidsVisitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "ci/pipeline.toml";
    const MINIMAL: &str = "name = \"p\"\n[[steps]]\nname = \"s\"\nrun = \"true\"\n";

    fn parse(text: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse(text, Path::new(FILE))
    }

    /// Asserts that `text` is refused with a message naming `key` and, when
    /// given, the 1-based `line`.
    #[track_caller]
    fn refused(text: &str, key: &str, line: Option<usize>) -> PipelineError {
        let err = match parse(text) {
            Ok(p) => panic!("accepted {text:?}: {p:?}"),
            Err(err) => err,
        };
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{key}`")), "key {key}: {msg}");
        match line {
            Some(line) => assert!(
                msg.starts_with(&format!("{FILE}:{line}:")),
                "line {line}: {msg}"
            ),
            None => assert!(msg.starts_with(&format!("{FILE}: ")), "no line: {msg}"),
        }
        err
    }

    fn step(name: &str) -> Step {
        Step {
            name: name.into(),
            run: "true".into(),
            shell: DEFAULT_SHELL.into(),
            env: BTreeMap::new(),
            timeout: None,
            working_directory: None,
            continue_on_error: false,
        }
    }

    #[test]
    fn defaults() {
        let p = parse(MINIMAL).unwrap();
        assert_eq!(
            p,
            Pipeline {
                name: "p".into(),
                timeout: Duration::from_secs(3600),
                env: BTreeMap::new(),
                upload: vec![],
                artifacts: vec![],
                steps: vec![step("s")],
            }
        );
        assert_eq!(p.steps[0].shell, "bash -eo pipefail");
    }

    #[test]
    fn every_key() {
        let text = r#"
name = "build and test"
timeout = "1h30m"
upload = ["src", "./Cargo.toml", "a/../b"]
artifacts = ["target/release/app"]

[env]
RUST_LOG = "debug"
_X1 = ""

[[steps]]
name = "build"
run = """
[ -d target ] || mkdir target
cargo build --release
"""
shell = "sh -e"
timeout = "20m"
working_directory = "src/app"
continue_on_error = true
env = { CARGO_INCREMENTAL = "0" }

[[steps]]
name = "test"
run = "cargo test"
[steps.env]
A = "b"
"#;
        let p = parse(text).unwrap();
        assert_eq!(
            p,
            Pipeline {
                name: "build and test".into(),
                timeout: Duration::from_secs(5400),
                env: [("RUST_LOG", "debug"), ("_X1", "")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                upload: ["src", "./Cargo.toml", "a/../b"].map(PathBuf::from).into(),
                artifacts: vec![PathBuf::from("target/release/app")],
                steps: vec![
                    Step {
                        name: "build".into(),
                        run: "[ -d target ] || mkdir target\ncargo build --release\n".into(),
                        shell: "sh -e".into(),
                        env: [("CARGO_INCREMENTAL".to_string(), "0".to_string())].into(),
                        timeout: Some(Duration::from_secs(1200)),
                        working_directory: Some(PathBuf::from("src/app")),
                        continue_on_error: true,
                    },
                    Step {
                        env: [("A".to_string(), "b".to_string())].into(),
                        run: "cargo test".into(),
                        ..step("test")
                    },
                ],
            }
        );
    }

    #[test]
    fn example_pipeline_parses() {
        let text = include_str!("../../../config/pipeline.toml");
        let p = Pipeline::parse(text, Path::new("config/pipeline.toml")).unwrap();
        assert!(!p.name.is_empty());
        assert!(p.steps.len() >= 2);
        assert!(!p.env.is_empty() && !p.upload.is_empty() && !p.artifacts.is_empty());
        // Every step key is exercised somewhere in the example.
        assert!(p.steps.iter().any(|s| s.shell != DEFAULT_SHELL));
        assert!(p.steps.iter().any(|s| !s.env.is_empty()));
        assert!(p.steps.iter().any(|s| s.timeout.is_some()));
        assert!(p.steps.iter().any(|s| s.working_directory.is_some()));
        assert!(p.steps.iter().any(|s| s.continue_on_error));
        for key in [
            "name =",
            "timeout =",
            "upload =",
            "artifacts =",
            "[env]",
            "[[steps]]",
            "run =",
            "shell =",
            "env =",
            "working_directory =",
            "continue_on_error =",
        ] {
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(key)),
                "config/pipeline.toml lacks {key}"
            );
        }
    }

    #[test]
    fn bad_names() {
        refused("timeout = \"1m\"\n", "name", None);
        refused(
            "name = \"  \"\n[[steps]]\nname = \"s\"\nrun = \"x\"\n",
            "name",
            Some(1),
        );
        let long = "x".repeat(129);
        refused(
            &format!("name = \"{long}\"\n[[steps]]\nname = \"s\"\nrun = \"x\"\n"),
            "name",
            Some(1),
        );
        let ok = "é".repeat(128);
        parse(&format!(
            "name = \"{ok}\"\n[[steps]]\nname = \"s\"\nrun = \"x\"\n"
        ))
        .unwrap();
        refused(
            "\nname = \"a\\tb\"\n[[steps]]\nname = \"s\"\nrun = \"x\"\n",
            "name",
            Some(2),
        );
    }

    #[test]
    fn bad_timeouts() {
        let with = |t: &str| format!("name = \"p\"\n{t}\n[[steps]]\nname = \"s\"\nrun = \"x\"\n");
        refused(&with("timeout = \"0s\""), "timeout", Some(2));
        let err = refused(&with("timeout = \"24h1s\""), "timeout", Some(2));
        assert!(err.to_string().contains("use at most \"24h\""), "{err}");
        parse(&with("timeout = \"24h\"")).unwrap();
        refused(&with("timeout = \"5x\""), "timeout", Some(2));
        refused(&with("timeout = 30"), "timeout", Some(2));
        let step = |t: &str| format!("name = \"p\"\n[[steps]]\nname = \"s\"\nrun = \"x\"\n{t}\n");
        refused(&step("timeout = \"0ms\""), "steps[0].timeout", Some(5));
        refused(&step("timeout = \"2d\""), "steps[0].timeout", Some(5));
        refused(&step("timeout = \"\""), "steps[0].timeout", Some(5));
        assert_eq!(
            parse(&step("timeout = \"90s\"")).unwrap().steps[0].timeout,
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn bad_steps() {
        refused("name = \"p\"\n", "steps", None);
        refused("name = \"p\"\nsteps = []\n", "steps", Some(2));
        let mut many = String::from("name = \"p\"\n");
        for i in 0..=MAX_STEPS {
            many.push_str(&format!("[[steps]]\nname = \"s{i}\"\nrun = \"x\"\n"));
        }
        refused(&many, "steps[256]", Some(2 + 3 * 256));
        refused(
            "name = \"p\"\n[steps]\nname = \"s\"\nrun = \"x\"\n",
            "steps",
            Some(2),
        );

        let two = |second: &str| {
            format!("name = \"p\"\n[[steps]]\nname = \"a\"\nrun = \"x\"\n\n[[steps]]\n{second}")
        };
        refused(&two("run = \"x\"\n"), "steps[1].name", Some(6));
        refused(&two("name = \"b\"\n"), "steps[1].run", Some(6));
        refused(&two("name = \"\"\nrun = \"x\"\n"), "steps[1].name", Some(7));
        refused(
            &two("name = \"b\\u0000\"\nrun = \"x\"\n"),
            "steps[1].name",
            Some(7),
        );
        let err = refused(
            &two("name = \"a\"\nrun = \"y\"\n"),
            "steps[1].name",
            Some(7),
        );
        assert!(
            err.to_string().contains("also the name of steps[0]"),
            "{err}"
        );
        refused(
            &two("name = \"b\"\nrun = \" \\n \"\n"),
            "steps[1].run",
            Some(8),
        );
        refused(
            &two("name = \"b\"\nrun = \"x\"\nshell = \"\"\n"),
            "steps[1].shell",
            Some(9),
        );
        refused(
            &two("name = \"b\"\nrun = \"x\"\ncontinue_on_error = \"yes\"\n"),
            "steps[1].continue_on_error",
            Some(9),
        );
    }

    #[test]
    fn bad_env() {
        let top =
            |e: &str| format!("name = \"p\"\n[env]\n{e}\n[[steps]]\nname = \"s\"\nrun = \"x\"\n");
        refused(&top("1A = \"x\""), "env.1A", Some(3));
        refused(&top("\"A-B\" = \"x\""), "env.A-B", Some(3));
        refused(&top("\"A B\" = \"x\""), "env.\"A B\"", Some(3));
        let err = refused(&top("TERN_JOB = \"x\""), "env.TERN_JOB", Some(3));
        assert!(
            err.to_string()
                .contains("reserved for the variables the runner sets"),
            "{err}"
        );
        parse(&top("TERNX = \"x\"\ntern_x = \"y\"")).unwrap();
        refused(&top("A = \"x\\u0000y\""), "env.A", Some(3));
        refused(&top("A = 1"), "env.A", Some(3));
        let many: String = (0..=MAX_ENV_VARS)
            .map(|i| format!("V{i} = \"\"\n"))
            .collect();
        refused(&top(&many), "env", Some(2));
        let fine: String = (0..MAX_ENV_VARS)
            .map(|i| format!("V{i} = \"\"\n"))
            .collect();
        parse(&top(&fine)).unwrap();

        let in_step = |e: &str| format!("{MINIMAL}env = {{ {e} }}\n");
        refused(&in_step("TERN_X = \"1\""), "steps[0].env.TERN_X", Some(5));
        refused(&in_step("X = true"), "steps[0].env.X", Some(5));
        let sub = format!("{MINIMAL}[steps.env]\nOK = \"1\"\n\"$X\" = \"1\"\n");
        refused(&sub, "steps[0].env.\"$X\"", Some(7));
    }

    #[test]
    fn bad_paths() {
        let top = |k: &str, v: &str| {
            format!("name = \"p\"\n{k} = [\"ok\", {v}]\n[[steps]]\nname = \"s\"\nrun = \"x\"\n")
        };
        for key in ["upload", "artifacts"] {
            for bad in [
                "\"\"",
                "\"/etc/passwd\"",
                "\"../x\"",
                "\"a/../../x\"",
                "\"..\"",
            ] {
                refused(&top(key, bad), &format!("{key}[1]"), Some(2));
            }
            parse(&top(key, "\"a/../b\"")).unwrap();
            refused(&top(key, "3"), &format!("{key}[1]"), Some(2));
            refused(&format!("name = \"p\"\n{key} = \"dist\"\n"), key, Some(2));
            let many: Vec<String> = (0..64).map(|i| format!("\"f{i}\"")).collect();
            refused(&top(key, &many.join(", ")), &format!("{key}[64]"), Some(2));
        }
        let err = refused(&top("upload", "\"/srv/ci/dist\""), "upload[1]", Some(2));
        assert!(err.to_string().contains("e.g. \"srv/ci/dist\""), "{err}");

        let dir = |d: &str| format!("{MINIMAL}working_directory = {d}\n");
        for bad in ["\"\"", "\"/tmp\"", "\"../x\"", "\"a/./../..\""] {
            refused(&dir(bad), "steps[0].working_directory", Some(5));
        }
        for good in [".", "./a", "a/b/../c", "a/..", "a//b/"] {
            let p = parse(&dir(&format!("{good:?}"))).unwrap();
            assert_eq!(p.steps[0].working_directory, Some(PathBuf::from(good)));
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = refused("name = \"p\"\ntimeot = \"1m\"\n", "timeot", Some(2));
        assert!(matches!(err, PipelineError::UnknownKey { .. }), "{err:?}");
        assert!(
            err.to_string().contains("`timeout`"),
            "lists what is known: {err}"
        );
        // A script line that looks like a table header must not confuse the
        // key path.
        let text = "name = \"p\"\n[[steps]]\nname = \"a\"\nrun = \"\"\"\n[ -f x ]\n\"\"\"\n\n\
                    [[steps]]\nname = \"b\"\nrun = \"x\"\nworkdir = \"src\"\n";
        let err = refused(text, "steps[1].workdir", Some(11));
        assert!(err.to_string().contains("working_directory"), "{err}");
        refused(
            &format!("{MINIMAL}[steps.extra]\na = 1\n"),
            "steps[0].extra",
            Some(5),
        );
        refused(&format!("{MINIMAL}[extra]\n"), "extra", Some(5));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let err = refused_syntax("name = \"p\"\n\n[[steps]\nname = \"s\"\n");
        assert!(err.starts_with(&format!("{FILE}:3:")), "{err}");
        let err = refused_syntax("name = \"p\"\nname = \"q\"\n");
        assert!(err.starts_with(&format!("{FILE}:2:")), "{err}");
        let err = refused_syntax("name = \"unterminated\n");
        assert!(err.starts_with(&format!("{FILE}:1:")), "{err}");
    }

    fn refused_syntax(text: &str) -> String {
        match parse(text) {
            Err(err @ PipelineError::Syntax { .. }) => err.to_string(),
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn validate_checks_a_deserialized_pipeline() {
        let good = parse(MINIMAL).unwrap();
        good.validate().unwrap();
        type Spoil = fn(&mut Pipeline);
        let cases: Vec<(Spoil, &str)> = vec![
            (|p| p.name.clear(), "name"),
            (|p| p.timeout = Duration::ZERO, "timeout"),
            (|p| p.steps.clear(), "steps"),
            (|p| p.upload.push("../../etc".into()), "upload[0]"),
            (|p| p.artifacts.push("/root".into()), "artifacts[0]"),
            (
                |p| {
                    p.env.insert("TERN_ID".into(), "1".into());
                },
                "env.TERN_ID",
            ),
            (|p| p.steps.push(step("s")), "steps[1].name"),
            (|p| p.steps[0].run.clear(), "steps[0].run"),
            (
                |p| p.steps[0].timeout = Some(MAX_TIMEOUT * 2),
                "steps[0].timeout",
            ),
            (
                |p| p.steps[0].working_directory = Some("../..".into()),
                "steps[0].working_directory",
            ),
        ];
        for (spoil, key) in cases {
            let mut p = good.clone();
            spoil(&mut p);
            let err = p.validate().unwrap_err();
            assert!(
                matches!(&err, PipelineError::Invalid { key: k, at: None, .. } if k == key),
                "{key}: {err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("pipeline: invalid `{key}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn serializes_in_the_file_format() {
        let text = include_str!("../../../config/pipeline.toml");
        let p = parse(text).unwrap();
        let again = toml::to_string(&p).unwrap();
        assert!(again.contains("timeout = \"2h\"\n"), "{again}");
        assert!(again.contains("timeout = \"30m\"\n"), "{again}");
        assert_eq!(parse(&again).unwrap(), p);
        // A wire peer may send a null step timeout, or a bare string from a
        // format that does not mark options.
        use serde::de::value::{Error, StrDeserializer, UnitDeserializer};
        assert_eq!(
            optional_duration(UnitDeserializer::<Error>::new()),
            Ok(None)
        );
        assert_eq!(
            optional_duration(StrDeserializer::<Error>::new("90s")),
            Ok(Some(Duration::from_secs(90)))
        );
        assert!(optional_duration(StrDeserializer::<Error>::new("90")).is_err());
    }

    #[test]
    fn check_uploads_reads_the_ci_workspace() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ws.path().join("dist/bin")).unwrap();
        std::fs::write(ws.path().join("Cargo.toml"), "").unwrap();
        let mut p = parse(MINIMAL).unwrap();
        p.upload = vec!["dist".into(), "dist/bin/../bin".into(), "Cargo.toml".into()];
        p.check_uploads(ws.path()).unwrap();

        p.upload.push("missing/file".into());
        let err = p.check_uploads(ws.path()).unwrap_err();
        let text =
            "name = \"x\"\nupload = [\n  \"dist\",\n  \"a\",\n  \"b\",\n  \"missing/file\",\n]\n";
        assert!(
            err.located(Path::new("ci.toml"), text)
                .starts_with("ci.toml:6:3: `upload[3]`"),
            "{}",
            err.located(Path::new("ci.toml"), text)
        );
        assert_eq!(
            err,
            PipelineError::UploadMissing {
                key: "upload[3]".into(),
                path: "missing/file".into(),
                workspace: ws.path().to_path_buf(),
            }
        );
        assert!(err.to_string().contains("missing/file"), "{err}");

        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join("escape")).unwrap();
        p.upload = vec!["escape".into()];
        let err = p.check_uploads(ws.path()).unwrap_err();
        assert!(
            matches!(&err, PipelineError::UploadUnusable { key, .. } if key == "upload[0]"),
            "{err:?}"
        );

        let err = p.check_uploads(&ws.path().join("nope")).unwrap_err();
        assert!(matches!(err, PipelineError::Workspace { .. }), "{err:?}");
    }

    /// The same rule as `check_path`, written independently over the string:
    /// accepted iff non-empty, not absolute, and no `..` climbs above the top.
    fn stays_inside(path: &str) -> bool {
        if path.is_empty() || path.starts_with('/') {
            return false;
        }
        let mut stack: Vec<&str> = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if stack.pop().is_none() {
                        return false;
                    }
                }
                other => stack.push(other),
            }
        }
        true
    }

    fn path_like() -> impl Strategy<Value = String> {
        prop_oneof![
            (
                any::<bool>(),
                proptest::collection::vec(
                    prop_oneof![
                        Just(".."),
                        Just("."),
                        Just(""),
                        Just("a"),
                        Just("..."),
                        Just("b.c")
                    ],
                    0..8
                )
            )
                .prop_map(|(root, parts)| format!(
                    "{}{}",
                    if root { "/" } else { "" },
                    parts.join("/")
                )),
            "[a./]{0,16}",
        ]
    }

    /// Fragments of plausible pipeline text, to reach deeper than random bytes.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("name = \"p\"\n".to_string()),
            Just("[[steps]]\nname = \"s\"\nrun = \"x\"\n".to_string()),
            Just("[env]\n".to_string()),
            Just("[steps.env]\n".to_string()),
            Just("upload = [\"a\", \"../b\"]\n".to_string()),
            Just("timeout = \"1h\"\n".to_string()),
            "[a-z_.]{1,12} = \"[ -~]{0,12}\"\n",
            "[a-z_.]{1,12} = [0-9]{1,6}\n",
            "\\[{1,2}[a-z.]{0,8}\\]{1,2}\n",
            "\\PC{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn parse_never_panics_on_pipeline_like_text(parts in proptest::collection::vec(fragment(), 0..12)) {
            let text = parts.concat();
            if let Ok(p) = parse(&text) {
                prop_assert_eq!(p.validate(), Ok(()));
            }
        }

        #[test]
        fn working_directory_stays_inside_the_workspace(dir in path_like()) {
            let text = format!("{MINIMAL}working_directory = {dir:?}\n");
            let result = parse(&text);
            prop_assert_eq!(result.is_ok(), stays_inside(&dir), "{:?}: {:?}", dir, result);
            if let Err(err) = result {
                prop_assert!(
                    matches!(&err, PipelineError::Invalid { key, at: Some(Position { line: 5, .. }), .. }
                        if key == "steps[0].working_directory"),
                    "{:?}", err
                );
            }
        }
    }
}
