//! The memtest guest's serial line protocol as data: the commands the client
//! sends and the parsed replies. Pure; the I/O lives in [`super::console`].

use std::fmt;

/// Longest line either side sends; the guest itself accepts 80 characters.
pub const MAX_LINE: usize = 256;

/// The protocol version this client speaks; the guest reports its own in
/// its banner and in every `STATUS` reply.
pub const PROTOCOL_VERSION: u32 = 1;

/// How fast the guest rewrites its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyRate {
    /// No rewriting; the guest sleeps (`hlt`) between commands.
    Idle,
    /// Paced rewriting at this many MiB/s (the guest accepts up to 1048576).
    MibPerSec(u32),
    /// As fast as the vCPU can (about 1.3 GiB/s under TCG on this kind of
    /// machine).
    Unthrottled,
}

impl From<u32> for DirtyRate {
    /// `0` is [`DirtyRate::Idle`], anything else a paced rate.
    fn from(mib_per_s: u32) -> Self {
        if mib_per_s == 0 {
            DirtyRate::Idle
        } else {
            DirtyRate::MibPerSec(mib_per_s)
        }
    }
}

impl fmt::Display for DirtyRate {
    /// The spelling used on the command line (`rate=`) and in `rate N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyRate::Idle => f.write_str("0"),
            DirtyRate::MibPerSec(n) => write!(f, "{n}"),
            DirtyRate::Unthrottled => f.write_str("max"),
        }
    }
}

impl DirtyRate {
    fn parse(value: &str) -> Option<Self> {
        if value == "max" {
            Some(DirtyRate::Unthrottled)
        } else {
            value.parse::<u32>().ok().map(DirtyRate::from)
        }
    }
}

/// The guest's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStatus {
    /// Pattern pages (4 KiB each) under test.
    pub pages: u32,
    /// The generation being written: one more than the completed passes of
    /// the dirtying walk over all pages.
    pub generation: u64,
    /// Page rewrites since the fill.
    pub writes: u64,
    /// The configured dirtying rate.
    pub rate: DirtyRate,
    /// Measured dirtying over the last whole second of guest time, KiB/s.
    pub dirty_kib_per_s: u64,
    /// Guest uptime in PIT ticks (about 1 ms each).
    pub ticks: u64,
    /// How long the initial fill took, in ticks.
    pub fill_ms: u64,
    /// The guest's protocol version.
    pub version: u32,
}

/// The guest's answer to `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every page holds exactly the content its table generation demands,
    /// and the table's sum matches the write counter.
    Intact {
        /// Pages checked.
        pages: u32,
        /// Page rewrites since the fill.
        writes: u64,
    },
    /// Some pages are lost, stale or corrupted, or the table itself is.
    Damaged {
        /// The lowest damaged page, if any page is.
        first: Option<u32>,
        /// How many pages are damaged.
        count: u32,
        /// Pages checked.
        pages: u32,
        /// Whether the generation table's sum matched the write counter.
        table_ok: bool,
    },
}

impl VerifyReport {
    /// True when the guest found its memory exactly as it left it.
    pub fn is_intact(&self) -> bool {
        matches!(self, VerifyReport::Intact { .. })
    }
}

/// Why a reply line could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct ParseError {
    /// What was missing or wrong.
    pub what: String,
}

/// The `key=value` fields after a reply's tag.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn of(rest: &'a str) -> Self {
        Fields(
            rest.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect(),
        )
    }

    fn raw(&self, key: &str) -> Result<&'a str, ParseError> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| ParseError {
                what: format!("no `{key}=` field"),
            })
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, ParseError> {
        let raw = self.raw(key)?;
        raw.parse().map_err(|_| ParseError {
            what: format!("`{key}={raw}` is not a number"),
        })
    }

    fn rate(&self) -> Result<DirtyRate, ParseError> {
        let raw = self.raw("rate")?;
        DirtyRate::parse(raw).ok_or_else(|| ParseError {
            what: format!("`rate={raw}` is not a rate"),
        })
    }
}

/// The fields of a reply if `line` starts with `tag` as a whole word.
pub fn tagged<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(tag)?;
    (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim_start())
}

/// Parses the fields of a `STATUS` reply.
pub fn parse_status(fields: &str) -> Result<GuestStatus, ParseError> {
    let f = Fields::of(fields);
    Ok(GuestStatus {
        pages: f.num("pages")?,
        generation: f.num("gen")?,
        writes: f.num("writes")?,
        rate: f.rate()?,
        dirty_kib_per_s: f.num("dirty_kib_s")?,
        ticks: f.num("ticks")?,
        fill_ms: f.num("fill_ms")?,
        version: f.num("version")?,
    })
}

/// Parses the fields of a `VERIFY` reply (`OK ...` or `BAD ...`).
pub fn parse_verify(fields: &str) -> Result<VerifyReport, ParseError> {
    if let Some(rest) = tagged(fields, "OK") {
        let f = Fields::of(rest);
        return Ok(VerifyReport::Intact {
            pages: f.num("pages")?,
            writes: f.num("writes")?,
        });
    }
    let rest = tagged(fields, "BAD").ok_or_else(|| ParseError {
        what: "neither OK nor BAD".to_owned(),
    })?;
    let f = Fields::of(rest);
    let first = match f.raw("first")? {
        "none" => None,
        _ => Some(f.num("first")?),
    };
    let table_ok = match f.raw("table")? {
        "ok" => true,
        "bad" => false,
        other => {
            return Err(ParseError {
                what: format!("`table={other}` is neither ok nor bad"),
            });
        }
    };
    Ok(VerifyReport::Damaged {
        first,
        count: f.num("count")?,
        pages: f.num("pages")?,
        table_ok,
    })
}

/// Parses the fields of a `RATE OK` reply into the rate now in force.
pub fn parse_rate_ok(fields: &str) -> Result<DirtyRate, ParseError> {
    let rest = tagged(fields, "OK").ok_or_else(|| ParseError {
        what: "not OK".to_owned(),
    })?;
    Fields::of(rest).rate()
}

/// Parses the fields of a `CORRUPT OK` reply into the corrupted page.
pub fn parse_corrupt_ok(fields: &str) -> Result<u32, ParseError> {
    let rest = tagged(fields, "OK").ok_or_else(|| ParseError {
        what: "not OK".to_owned(),
    })?;
    Fields::of(rest).num("page")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_parses_every_field() {
        let line = "STATUS pages=25600 gen=3 writes=75008 rate=100 dirty_kib_s=102400 ticks=3547 fill_ms=120 version=1";
        let status = parse_status(tagged(line, "STATUS").unwrap()).unwrap();
        assert_eq!(
            status,
            GuestStatus {
                pages: 25600,
                generation: 3,
                writes: 75008,
                rate: DirtyRate::MibPerSec(100),
                dirty_kib_per_s: 102400,
                ticks: 3547,
                fill_ms: 120,
                version: 1,
            }
        );
    }

    #[test]
    fn rate_spellings_round_trip() {
        for rate in [
            DirtyRate::Idle,
            DirtyRate::MibPerSec(42),
            DirtyRate::Unthrottled,
        ] {
            assert_eq!(DirtyRate::parse(&rate.to_string()), Some(rate));
        }
        assert_eq!(DirtyRate::from(0), DirtyRate::Idle);
        assert_eq!(DirtyRate::parse("fast"), None);
    }

    #[test]
    fn verify_replies_parse_both_outcomes() {
        assert_eq!(
            parse_verify("OK pages=10 writes=7").unwrap(),
            VerifyReport::Intact {
                pages: 10,
                writes: 7
            }
        );
        assert_eq!(
            parse_verify("BAD first=5 count=2 pages=10 table=ok").unwrap(),
            VerifyReport::Damaged {
                first: Some(5),
                count: 2,
                pages: 10,
                table_ok: true
            }
        );
        assert_eq!(
            parse_verify("BAD first=none count=0 pages=10 table=bad").unwrap(),
            VerifyReport::Damaged {
                first: None,
                count: 0,
                pages: 10,
                table_ok: false
            }
        );
    }

    #[test]
    fn malformed_replies_name_the_problem() {
        assert!(
            parse_verify("MAYBE")
                .unwrap_err()
                .what
                .contains("neither OK nor BAD")
        );
        assert!(parse_status("pages=1").unwrap_err().what.contains("gen="));
        assert!(
            parse_corrupt_ok("OK page=x")
                .unwrap_err()
                .what
                .contains("not a number")
        );
    }

    #[test]
    fn tags_match_whole_words_only() {
        assert_eq!(tagged("PONG 7", "PONG"), Some("7"));
        assert_eq!(tagged("PONG", "PONG"), Some(""));
        assert_eq!(tagged("PONGS 7", "PONG"), None);
    }
}
