//! PEM-style text armor for keys and certificates, so they paste into a CI
//! secret or a config file:
//!
//! ```text
//! -----BEGIN TERN CERTIFICATE-----
//! <standard base64, 64 columns>
//! -----END TERN CERTIFICATE-----
//! ```
//!
//! A text may hold several blocks. Text outside blocks (blank lines, `#`
//! comments, notes) is ignored; inside a block only base64 lines and blank
//! lines are allowed. Lines may be indented and may end in `\r\n`, because
//! secrets pasted through YAML and Windows editors pick up both. PEM headers
//! (`Proc-Type:` and friends) are not supported: nothing here needs them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Columns of base64 per line in [`encode`]'s output.
pub const LINE_WIDTH: usize = 64;

const BEGIN: &str = "-----BEGIN ";
const END: &str = "-----END ";
const DASHES: &str = "-----";

/// Why armored text was refused. Line numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArmorError {
    #[error("no armored block found: expected a \"-----BEGIN {expected}-----\" line; check that the whole file was copied")]
    NoBlock { expected: String },
    #[error("line {line}: bad armor label {text:?}: expected \"-----BEGIN LABEL-----\" with an upper-case label")]
    BadLabel { line: usize, text: String },
    #[error("line {line}: \"-----END\" without a matching \"-----BEGIN\" line")]
    UnexpectedEnd { line: usize },
    #[error("line {line}: \"-----BEGIN\" inside the block opened at line {open_line}; is an END line missing?")]
    NestedBegin { line: usize, open_line: usize },
    #[error("line {line}: block opened as {begin:?} is closed as {end:?}")]
    LabelMismatch {
        line: usize,
        begin: String,
        end: String,
    },
    #[error("line {line}: block {label:?} has no \"-----END {label}-----\" line; the text looks cut off")]
    Unterminated { line: usize, label: String },
    #[error("line {line}: invalid base64 in block {label:?}: {reason}")]
    BadBase64 {
        line: usize,
        label: String,
        reason: String,
    },
    #[error("line {line}: block {label:?} is empty")]
    EmptyBlock { line: usize, label: String },
    #[error(
        "found a {found:?} block where a {expected:?} block was expected; is this the right file?"
    )]
    WrongLabel { expected: String, found: String },
    #[error("found {count} armored blocks where exactly one {expected:?} block was expected; split the file")]
    MultipleBlocks { expected: String, count: usize },
}

/// Armors `bytes` under `label` (e.g. `"TERN CERTIFICATE"`). The output ends
/// in a newline.
pub fn encode(label: &str, bytes: &[u8]) -> String {
    let b64 = STANDARD.encode(bytes);
    let mut out = String::with_capacity(b64.len() + b64.len() / LINE_WIDTH + 2 * label.len() + 40);
    out.push_str(BEGIN);
    out.push_str(label);
    out.push_str(DASHES);
    out.push('\n');
    // Base64 output is ASCII, so byte chunks are char boundaries.
    for chunk in b64.as_bytes().chunks(LINE_WIDTH) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(END);
    out.push_str(label);
    out.push_str(DASHES);
    out.push('\n');
    out
}

/// Decodes every block in `text`, in order, as `(label, bytes)`.
///
/// Returns an empty list when there are no blocks at all; any malformed block
/// is an error naming its line.
pub fn decode_all(text: &str) -> Result<Vec<(String, Vec<u8>)>, ArmorError> {
    struct Open {
        line: usize,
        label: String,
        b64: String,
    }
    let mut blocks = Vec::new();
    let mut open: Option<Open> = None;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if let Some(block) = open.as_mut() {
            if line.starts_with(BEGIN) {
                return Err(ArmorError::NestedBegin {
                    line: line_no,
                    open_line: block.line,
                });
            }
            if line.starts_with(END) {
                let end_label = parse_marker(line, END).ok_or_else(|| ArmorError::BadLabel {
                    line: line_no,
                    text: line.to_string(),
                })?;
                if end_label != block.label {
                    return Err(ArmorError::LabelMismatch {
                        line: line_no,
                        begin: block.label.clone(),
                        end: end_label.to_string(),
                    });
                }
                if block.b64.is_empty() {
                    return Err(ArmorError::EmptyBlock {
                        line: block.line,
                        label: block.label.clone(),
                    });
                }
                let bytes =
                    STANDARD
                        .decode(block.b64.as_bytes())
                        .map_err(|e| ArmorError::BadBase64 {
                            line: block.line,
                            label: block.label.clone(),
                            reason: e.to_string(),
                        })?;
                blocks.push((std::mem::take(&mut block.label), bytes));
                open = None;
                continue;
            }
            if line.is_empty() {
                continue;
            }
            if let Some(bad) = line.chars().find(|c| !is_base64_char(*c)) {
                return Err(ArmorError::BadBase64 {
                    line: line_no,
                    label: block.label.clone(),
                    reason: format!("unexpected character {bad:?}"),
                });
            }
            block.b64.push_str(line);
        } else if line.starts_with(BEGIN) {
            let label = parse_marker(line, BEGIN).ok_or_else(|| ArmorError::BadLabel {
                line: line_no,
                text: line.to_string(),
            })?;
            open = Some(Open {
                line: line_no,
                label: label.to_string(),
                b64: String::new(),
            });
        } else if line.starts_with(END) {
            return Err(ArmorError::UnexpectedEnd { line: line_no });
        }
        // Anything else outside a block is a comment or a note: ignored.
    }
    if let Some(block) = open {
        return Err(ArmorError::Unterminated {
            line: block.line,
            label: block.label,
        });
    }
    Ok(blocks)
}

/// Decodes the single block in `text`, which must carry `expected_label`.
pub fn decode_one(text: &str, expected_label: &str) -> Result<Vec<u8>, ArmorError> {
    let mut blocks = decode_all(text)?;
    match blocks.len() {
        0 => Err(ArmorError::NoBlock {
            expected: expected_label.to_string(),
        }),
        1 => {
            let (label, bytes) = blocks.remove(0);
            if label == expected_label {
                Ok(bytes)
            } else {
                Err(ArmorError::WrongLabel {
                    expected: expected_label.to_string(),
                    found: label,
                })
            }
        }
        count => Err(ArmorError::MultipleBlocks {
            expected: expected_label.to_string(),
            count,
        }),
    }
}

/// Lower-case hex, for fingerprints and keys in human output.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Parses lower- or upper-case hex of exactly `N` bytes.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// `-----BEGIN LABEL-----` → `LABEL`, if the label is well formed.
fn parse_marker<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let label = line.strip_prefix(prefix)?.strip_suffix(DASHES)?;
    let ok = !label.is_empty()
        && label.len() <= 64
        && !label.starts_with(' ')
        && !label.ends_with(' ')
        && label
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ' || b == b'-');
    ok.then_some(label)
}

fn is_base64_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_wraps_at_64_columns() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let text = encode("TERN TEST", &bytes);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN TERN TEST-----");
        assert_eq!(*lines.last().unwrap(), "-----END TERN TEST-----");
        for body in &lines[1..lines.len() - 2] {
            assert_eq!(body.len(), LINE_WIDTH);
        }
        assert!(lines[lines.len() - 2].len() <= LINE_WIDTH);
        assert_eq!(decode_one(&text, "TERN TEST").unwrap(), bytes);
    }

    #[test]
    fn several_blocks_with_comments_and_crlf() {
        let text = format!(
            "# two CAs\r\n\r\nfirst one:\n{}\n  # second\n{}",
            encode("A", b"one"),
            encode("B", b"two").replace('\n', "\r\n")
        );
        let blocks = decode_all(&text).unwrap();
        assert_eq!(
            blocks,
            vec![
                ("A".to_string(), b"one".to_vec()),
                ("B".to_string(), b"two".to_vec())
            ]
        );
    }

    #[test]
    fn indented_block_decodes() {
        let text: String = encode("A", b"indented bytes")
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        assert_eq!(decode_one(&text, "A").unwrap(), b"indented bytes");
    }

    #[test]
    fn errors_name_the_line() {
        let good = encode("A", b"hello");
        let cut = good.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(
            decode_all(&cut),
            Err(ArmorError::Unterminated {
                line: 1,
                label: "A".into()
            })
        );
        assert_eq!(
            decode_all("x\n-----END A-----\n"),
            Err(ArmorError::UnexpectedEnd { line: 2 })
        );
        assert!(matches!(
            decode_all("-----BEGIN A-----\naGVsbG8=\n-----END B-----\n"),
            Err(ArmorError::LabelMismatch { line: 3, .. })
        ));
        assert!(matches!(
            decode_all("-----BEGIN A-----\n-----BEGIN A-----\n"),
            Err(ArmorError::NestedBegin {
                line: 2,
                open_line: 1
            })
        ));
        assert!(matches!(
            decode_all("\n-----BEGIN A-----\naGVs*G8=\n-----END A-----\n"),
            Err(ArmorError::BadBase64 { line: 3, .. })
        ));
        assert!(matches!(
            decode_all("-----BEGIN A-----\naGVsbG8\n-----END A-----\n"),
            Err(ArmorError::BadBase64 { line: 1, .. })
        ));
        assert!(matches!(
            decode_all("-----BEGIN a-----\n"),
            Err(ArmorError::BadLabel { line: 1, .. })
        ));
        assert!(matches!(
            decode_all("-----BEGIN A-----\n\n-----END A-----\n"),
            Err(ArmorError::EmptyBlock { line: 1, .. })
        ));
    }

    #[test]
    fn decode_one_checks_count_and_label() {
        assert_eq!(
            decode_one("# nothing here\n", "A"),
            Err(ArmorError::NoBlock {
                expected: "A".into()
            })
        );
        let two = format!("{}{}", encode("A", b"1"), encode("A", b"2"));
        assert_eq!(
            decode_one(&two, "A"),
            Err(ArmorError::MultipleBlocks {
                expected: "A".into(),
                count: 2
            })
        );
        assert_eq!(
            decode_one(&encode("B", b"1"), "A"),
            Err(ArmorError::WrongLabel {
                expected: "A".into(),
                found: "B".into()
            })
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(unhex::<3>("00ABff"), Some([0x00, 0xab, 0xff]));
        assert_eq!(unhex::<3>("00abf"), None);
        assert_eq!(unhex::<1>("g0"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC*") {
            let _ = decode_all(&s);
        }

        #[test]
        fn arbitrary_block_body_never_panics(body in "[A-Za-z0-9+/=\n #-]{0,200}") {
            let _ = decode_all(&format!("-----BEGIN A-----\n{body}\n-----END A-----\n"));
        }

        #[test]
        fn encode_decode_round_trips(bytes in proptest::collection::vec(any::<u8>(), 1..600)) {
            let text = encode("TERN X", &bytes);
            prop_assert_eq!(decode_one(&text, "TERN X").unwrap(), bytes);
        }
    }
}
