//! Drawing a group for a terminal: the bucket grid colored by owner, the member legend, and
//! durations written for people. Plain ANSI escape codes; the grid arithmetic is pure and tested.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use redbuckets::GroupSnapshot;

/// Clear the screen and go home. Redrawing from the top avoids flicker without a TUI crate.
pub const CLEAR: &str = "\x1b[H\x1b[2J";
/// Hide / show the cursor while redrawing.
pub const HIDE_CURSOR: &str = "\x1b[?25l";
pub const SHOW_CURSOR: &str = "\x1b[?25h";
const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";

/// 256-color codes that stay apart on dark and light backgrounds.
const COLORS: [u8; 12] = [39, 208, 40, 199, 226, 93, 51, 196, 130, 250, 118, 27];

/// `n` things, with the noun in the singular for one: `1 bucket`, `2 buckets`.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A duration as people read it: `850ms`, `1.25s`, `42s`, `3m12s`, `2h05m`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d < Duration::from_millis(1) && !d.is_zero() {
        format!("{}µs", d.as_micros())
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        trim_zeros(format!("{:.2}s", d.as_secs_f64()))
    } else if ms < 60_000 {
        trim_zeros(format!("{:.1}s", d.as_secs_f64()))
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
    }
}

/// `1.50s` → `1.5s`, `2.00s` → `2s`.
fn trim_zeros(s: String) -> String {
    let number = s.trim_end_matches('s');
    if !number.contains('.') {
        return s;
    }
    format!("{}s", number.trim_end_matches('0').trim_end_matches('.'))
}

/// Bucket-time (the sum over buckets of the time each was unowned) in bucket-seconds.
pub fn fmt_bucket_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.3} bucket·s")
    } else {
        format!("{s:.1} bucket·s")
    }
}

/// Bucket ids as compact ranges: `0-15,17,20-21`.
pub fn fmt_ranges(buckets: &[u32]) -> String {
    let mut sorted = buckets.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// The terminal's size in columns and rows (80×24 when unknown).
pub fn terminal_size() -> (usize, usize) {
    terminal_size::terminal_size()
        .map(|(w, h)| (usize::from(w.0), usize::from(h.0)))
        .unwrap_or((80, 24))
}

/// One cell of the grid: a block of consecutive buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Most of the block is unowned.
    Free,
    /// Most of the block is owned by owner `owner`; `whole` when that owner has all of it.
    Owned { owner: usize, whole: bool },
}

/// Groups `owners` (an owner index per bucket, `None` for free) into at most `max_cells` cells
/// of `block` consecutive buckets each, `block = ceil(B / max_cells)`. Each cell shows the
/// majority of its block (free counts as a candidate); ties go to the lowest owner index.
pub fn grid(owners: &[Option<usize>], max_cells: usize) -> (usize, Vec<Cell>) {
    let block = owners.len().div_ceil(max_cells.max(1)).max(1);
    let mut counts: HashMap<Option<usize>, usize> = HashMap::new();
    let cells = owners
        .chunks(block)
        .map(|chunk| {
            counts.clear();
            for o in chunk {
                *counts.entry(*o).or_default() += 1;
            }
            let (best, n) = counts
                .iter()
                .max_by(|a, b| {
                    a.1.cmp(b.1).then_with(|| match (a.0, b.0) {
                        // Prefer owners over free, then lower indices.
                        (Some(x), Some(y)) => y.cmp(x),
                        (Some(_), None) => std::cmp::Ordering::Greater,
                        (None, Some(_)) => std::cmp::Ordering::Less,
                        (None, None) => std::cmp::Ordering::Equal,
                    })
                })
                .map(|(o, n)| (*o, *n))
                .unwrap_or((None, 0));
            match best {
                None => Cell::Free,
                Some(owner) => Cell::Owned {
                    owner,
                    whole: n == chunk.len(),
                },
            }
        })
        .collect();
    (block, cells)
}

/// Member id → color, stable while the member stays: a newcomer gets the first color no
/// present member uses.
#[derive(Debug, Default)]
pub struct Palette {
    assigned: HashMap<String, usize>,
}

impl Palette {
    fn color(&mut self, id: &str, present: &[&str]) -> u8 {
        if let Some(slot) = self.assigned.get(id) {
            return COLORS[slot % COLORS.len()];
        }
        let used: Vec<usize> = present
            .iter()
            .filter_map(|p| self.assigned.get(*p))
            .map(|s| s % COLORS.len())
            .collect();
        let slot = (0..COLORS.len())
            .find(|s| !used.contains(s))
            .unwrap_or(self.assigned.len() % COLORS.len());
        self.assigned.insert(id.to_string(), slot);
        COLORS[slot]
    }
}

/// Whether colors are off: `NO_COLOR` set to anything but the empty string (no-color.org).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Removes the color and style sequences (`ESC [ … m`) from `text`; cursor moves stay.
fn strip_styles(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\x1b[") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find(|c: char| c.is_ascii_alphabetic()) {
            Some(end) if after.as_bytes()[end] == b'm' => rest = &after[end + 1..],
            _ => {
                out.push_str("\x1b[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The letter that stands for member `i` when colors are off.
fn letter(i: usize) -> char {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    char::from(LETTERS[i % LETTERS.len()])
}

/// Draws one full frame for a terminal of `width × height`: the `header` lines, the member
/// legend with counts, and the grid. With `NO_COLOR`, members are letters instead of colors.
pub fn frame(
    header: &[String],
    snapshot: &GroupSnapshot,
    palette: &mut Palette,
    size: (usize, usize),
) -> String {
    if no_color() {
        strip_styles(&draw(header, snapshot, palette, size, true))
    } else {
        draw(header, snapshot, palette, size, false)
    }
}

fn draw(
    header: &[String],
    snapshot: &GroupSnapshot,
    palette: &mut Palette,
    (width, height): (usize, usize),
    letters: bool,
) -> String {
    let mut out = String::new();
    for (i, line) in header.iter().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "{BOLD}{line}{RESET}");
        } else {
            let _ = writeln!(out, "{line}");
        }
    }

    // Owners the member list doesn't name (a session just purged) still get a color.
    let mut ids: Vec<&str> = snapshot.members.iter().map(|m| m.id.as_str()).collect();
    for owner in snapshot.owners.iter().flatten() {
        if !ids.contains(&owner.member.as_str()) {
            ids.push(owner.member.as_str());
        }
    }
    let colors: Vec<u8> = ids.iter().map(|id| palette.color(id, &ids)).collect();
    let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();

    let legend_room = height.saturating_sub(header.len() + 6).max(3) / 2;
    let _ = writeln!(out);
    for (i, m) in snapshot.members.iter().enumerate() {
        if i + 1 == legend_room && snapshot.members.len() > legend_room {
            let _ = writeln!(out, "  … and {} more members", snapshot.members.len() - i);
            break;
        }
        let pending = m.held.saturating_sub(m.committed);
        let mark = if letters { letter(i) } else { '█' };
        let _ = write!(
            out,
            "  \x1b[38;5;{}m{mark}{RESET} {:<24} {:>6}",
            colors[i],
            truncate(&m.id, 24),
            m.held
        );
        if m.weight != 1 {
            let _ = write!(out, "  weight {}", m.weight);
        }
        if pending > 0 {
            let _ = write!(out, "  {DIM}releasing {pending}{RESET}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "  {DIM}.{RESET} {:<24} {:>6}", "free", snapshot.free());
    let _ = writeln!(out);

    let used = out.lines().count() + 2;
    let cols = width.saturating_sub(2).clamp(8, 128);
    let rows = height.saturating_sub(used).max(2);
    let owners: Vec<Option<usize>> = snapshot
        .owners
        .iter()
        .map(|o| {
            o.as_ref()
                .and_then(|o| index.get(o.member.as_str()).copied())
        })
        .collect();
    let (block, cells) = grid(&owners, rows * cols);
    if block == 1 {
        let _ = writeln!(out, "{DIM}one cell per bucket{RESET}");
    } else {
        let (how, shared) = if letters {
            ("lettered", "lower case")
        } else {
            ("colored", "▒")
        };
        let _ = writeln!(
            out,
            "{DIM}one cell per {block} buckets, {how} by the owner of most of them ({shared}: shared){RESET}"
        );
    }
    for row in cells.chunks(cols) {
        out.push_str("  ");
        let mut current: Option<u8> = None;
        for cell in row {
            match cell {
                Cell::Free => {
                    if current.take().is_some() {
                        out.push_str(RESET);
                    }
                    out.push('.');
                }
                Cell::Owned { owner, whole } => {
                    let color = colors[*owner];
                    if current != Some(color) {
                        let _ = write!(out, "\x1b[38;5;{color}m");
                        current = Some(color);
                    }
                    out.push(match (letters, *whole) {
                        (true, true) => letter(*owner),
                        (true, false) => letter(*owner).to_ascii_lowercase(),
                        (false, true) => '█',
                        (false, false) => '▒',
                    });
                }
            }
        }
        out.push_str(RESET);
        out.push('\n');
    }
    out
}

/// A one-line summary of a snapshot, for logs and pipes.
pub fn summary_line(snapshot: &GroupSnapshot) -> String {
    let a = crate::analysis::analyze(snapshot);
    let mut line = format!(
        "members={} free={} version={}",
        snapshot.members.len(),
        a.free,
        snapshot.version
    );
    if let (Some((lo, _)), Some((hi, _))) = (&a.min, &a.max) {
        let _ = write!(line, " min={lo} max={hi}");
    }
    if !snapshot.quarantine.is_zero() {
        let _ = write!(line, " warming_up={}", fmt_duration(snapshot.quarantine));
    }
    if a.draining > 0 {
        let _ = write!(line, " releasing={}", a.draining);
    }
    for m in &snapshot.members {
        let _ = write!(line, " {}={}", m.id, m.held);
    }
    line
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_are_stripped_and_cursor_moves_kept() {
        let styled = format!("{CLEAR}{BOLD}title{RESET} \x1b[38;5;39mA{RESET}.");
        assert_eq!(strip_styles(&styled), format!("{CLEAR}title A."));
    }

    #[test]
    fn durations_read_well() {
        let cases = [
            (Duration::ZERO, "0ms"),
            (Duration::from_micros(250), "250µs"),
            (Duration::from_millis(850), "850ms"),
            (Duration::from_millis(1250), "1.25s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(42_000), "42s"),
            (Duration::from_millis(42_500), "42.5s"),
            (Duration::from_secs(192), "3m12s"),
            (Duration::from_secs(7500), "2h05m"),
        ];
        for (d, want) in cases {
            assert_eq!(fmt_duration(d), want);
        }
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(fmt_ranges(&[]), "");
        assert_eq!(fmt_ranges(&[5]), "5");
        assert_eq!(fmt_ranges(&[3, 0, 1, 2, 7, 9, 10]), "0-3,7,9-10");
    }

    #[test]
    fn one_cell_per_bucket_when_it_fits() {
        let owners = vec![Some(0), None, Some(1)];
        let (block, cells) = grid(&owners, 100);
        assert_eq!(block, 1);
        assert_eq!(
            cells,
            vec![
                Cell::Owned {
                    owner: 0,
                    whole: true
                },
                Cell::Free,
                Cell::Owned {
                    owner: 1,
                    whole: true
                }
            ]
        );
    }

    #[test]
    fn blocks_take_the_majority() {
        // 65,536 buckets on 2,000 cells: 33 buckets per cell, 1,986 cells.
        let owners: Vec<Option<usize>> = (0..65_536).map(|b| Some(b / 16_384)).collect();
        let (block, cells) = grid(&owners, 2000);
        assert_eq!(block, 33);
        assert_eq!(cells.len(), 65_536usize.div_ceil(33));
        assert!(cells.len() <= 2000);

        let owners = vec![Some(1), Some(1), None, Some(2), None, None];
        let (block, cells) = grid(&owners, 2);
        assert_eq!(block, 3);
        assert_eq!(
            cells,
            vec![
                Cell::Owned {
                    owner: 1,
                    whole: false
                },
                Cell::Free
            ]
        );
        // A tie between an owner and free shows the owner.
        let (_, cells) = grid(&[Some(4), None], 1);
        assert_eq!(
            cells,
            vec![Cell::Owned {
                owner: 4,
                whole: false
            }]
        );
    }

    #[test]
    fn colors_stay_with_members() {
        let mut p = Palette::default();
        let a = p.color("a", &["a", "b"]);
        let b = p.color("b", &["a", "b"]);
        assert_ne!(a, b);
        // "a" leaves; "c" takes its color, "b" keeps its own.
        let c = p.color("c", &["b", "c"]);
        assert_eq!(c, a);
        assert_eq!(p.color("b", &["b", "c"]), b);
    }
}
