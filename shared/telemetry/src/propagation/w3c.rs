//! Strict W3C Trace Context and Baggage checks, applied before the SDK parsers see a value.
//!
//! The Rust `TraceContextPropagator` accepts `traceparent` forms the W3C spec rejects (a 30-hex
//! trace id, a leading `+`, one-character version or flags, a trailing `-`), and nothing in the
//! SDK bounds `tracestate` or `baggage` before they are copied into the next hop's headers. An
//! AMQP header frame larger than the broker's `frame_max` closes the whole connection, so every
//! value that crosses a carrier goes through these functions first.

use std::borrow::Cow;

/// Header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// Header carrying W3C baggage.
pub const BAGGAGE: &str = "baggage";

/// W3C Trace Context §3.3.1.1: at most 32 list-members.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// W3C Trace Context §3.3.1.5: vendors propagate at least 512 characters of `tracestate`.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// W3C Trace Context §3.3.1.5: when trimming, members longer than this go first.
pub const TRACESTATE_LONG_MEMBER: usize = 128;
/// W3C Baggage §3.3.2: at least 64 list-members are propagated; we propagate at most that.
pub const MAX_BAGGAGE_MEMBERS: usize = 64;
/// W3C Baggage §3.3.2: at least 8192 bytes are propagated; we propagate at most that.
pub const MAX_BAGGAGE_LEN: usize = 8192;

/// Length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const TRACEPARENT_LEN: usize = 55;

/// The fields of a `traceparent` that passed [`parse_traceparent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    /// The version (`00` today).
    pub version: u8,
    /// The trace id, never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span id, never all zero.
    pub parent_id: [u8; 8],
    /// The trace flags, all eight bits as sent.
    pub flags: u8,
}

/// Whether `value` is a `traceparent` the W3C spec lets a receiver continue.
///
/// Lowercase hex only, exact field widths, non-zero ids, version `ff` forbidden, and for version
/// `00` nothing after the flags. A higher version may append fields after a `-` (§3.2.4).
pub fn is_valid_traceparent(value: &str) -> bool {
    parse_traceparent(value).is_some()
}

/// Checks `value` as [`is_valid_traceparent`] does and decodes it in the same pass (one table
/// lookup per byte: this runs on every hop of every request).
pub fn parse_traceparent(value: &str) -> Option<Traceparent> {
    let bytes = value.as_bytes();
    if bytes.len() < TRACEPARENT_LEN {
        return None;
    }
    let (head, rest) = bytes.split_at(TRACEPARENT_LEN);
    if head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
        return None;
    }
    let mut fields = Traceparent { version: 0, trace_id: [0; 16], parent_id: [0; 8], flags: 0 };
    let mut version = [0u8; 1];
    let mut flags = [0u8; 1];
    // `&`, not `&&`: all four are decoded either way, and no branch per field.
    let hex = decode_lower_hex(&head[0..2], &mut version)
        & decode_lower_hex(&head[3..35], &mut fields.trace_id)
        & decode_lower_hex(&head[36..52], &mut fields.parent_id)
        & decode_lower_hex(&head[53..55], &mut flags);
    [fields.version] = version;
    [fields.flags] = flags;
    if !hex || fields.version == 0xff || fields.trace_id == [0; 16] || fields.parent_id == [0; 8] {
        return None;
    }
    let rest_ok = match rest {
        [] => true,
        // Version 00 has exactly four fields; only a future version may carry more.
        _ if fields.version == 0 => false,
        [b'-', more @ ..] => !more.is_empty(),
        _ => false,
    };
    rest_ok.then_some(fields)
}

/// Marks every byte that is not a lowercase hex digit (its high bits are set).
const NOT_HEX: u8 = 0xf0;

/// The value of each lowercase hex digit, [`NOT_HEX`] for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut digit = 0;
    while digit < 10 {
        table[b'0' as usize + digit] = digit as u8;
        digit += 1;
    }
    let mut letter = 0;
    while letter < 6 {
        table[b'a' as usize + letter] = 10 + letter as u8;
        letter += 1;
    }
    table
};

/// Decodes `hex` (two lowercase hex digits per byte of `out`) into `out`; false when a byte is
/// not a lowercase hex digit (`out` then holds garbage).
fn decode_lower_hex(hex: &[u8], out: &mut [u8]) -> bool {
    let mut seen = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (HEX_VALUE[usize::from(pair[0])], HEX_VALUE[usize::from(pair[1])]);
        seen |= high | low;
        *byte = high << 4 | low;
    }
    seen & NOT_HEX == 0
}

/// What [`bound_tracestate`] and [`bound_baggage`] did to a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bounded<'a> {
    /// Within the limits, passed on unchanged.
    Kept(&'a str),
    /// Over a limit, shortened by whole list-members.
    Trimmed(String),
    /// Unusable (over the member count W3C allows, or nothing left after trimming).
    Dropped,
}

impl<'a> Bounded<'a> {
    /// The value to propagate, if any.
    pub fn into_value(self) -> Option<Cow<'a, str>> {
        match self {
            Bounded::Kept(value) => Some(Cow::Borrowed(value)),
            Bounded::Trimmed(value) => Some(Cow::Owned(value)),
            Bounded::Dropped => None,
        }
    }
}

/// Bounds a `tracestate` header to W3C's limits.
///
/// More than 32 members makes the header invalid (§3.3.1.1): it is dropped. Over 512 characters
/// it is trimmed as §3.3.1.5 says: members longer than 128 characters go first, then members
/// from the right, until it fits.
pub fn bound_tracestate(value: &str) -> Bounded<'_> {
    let members = || value.split(',').map(str::trim).filter(|m| !m.is_empty());
    if members().nth(MAX_TRACESTATE_MEMBERS).is_some() {
        return Bounded::Dropped;
    }
    if value.len() <= MAX_TRACESTATE_LEN {
        return Bounded::Kept(value);
    }
    let mut kept: Vec<&str> = members().filter(|m| m.len() <= TRACESTATE_LONG_MEMBER).collect();
    while joined_len(&kept) > MAX_TRACESTATE_LEN {
        kept.pop();
    }
    if kept.is_empty() { Bounded::Dropped } else { Bounded::Trimmed(kept.join(",")) }
}

/// Bounds a `baggage` header to W3C's limits: at most 64 members and 8192 bytes.
///
/// Members are kept from the left while both limits hold; a member is never cut in half
/// (W3C Baggage §3.3.2: no partial list-members). The scan stops at the limit, so a hostile
/// megabyte-sized header costs no more than a legal one.
pub fn bound_baggage(value: &str) -> Bounded<'_> {
    if value.len() <= MAX_BAGGAGE_LEN && value.bytes().filter(|&b| b == b',').count() < MAX_BAGGAGE_MEMBERS {
        return Bounded::Kept(value);
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut len = 0;
    for member in value.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let added = member.len() + usize::from(!kept.is_empty());
        if kept.len() == MAX_BAGGAGE_MEMBERS || len + added > MAX_BAGGAGE_LEN {
            break;
        }
        len += added;
        kept.push(member);
    }
    if kept.is_empty() { Bounded::Dropped } else { Bounded::Trimmed(kept.join(",")) }
}

fn joined_len(members: &[&str]) -> usize {
    members.iter().map(|m| m.len()).sum::<usize>() + members.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn accepts_a_spec_example() {
        assert!(is_valid_traceparent(VALID));
        assert!(is_valid_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"));
    }

    #[test]
    fn accepts_a_future_version_with_extra_fields() {
        assert!(is_valid_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds"));
    }

    #[test]
    fn decodes_the_fields_it_accepts() {
        let fields = parse_traceparent(VALID).expect("the spec example is valid");
        assert_eq!(fields.version, 0);
        assert_eq!(fields.trace_id, 0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes());
        assert_eq!(fields.parent_id, 0xb7ad6b7169203331_u64.to_be_bytes());
        assert_eq!(fields.flags, 1);
        let future = parse_traceparent("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-fe-x").expect("valid");
        assert_eq!((future.version, future.flags), (0xcc, 0xfe));
    }

    #[test]
    fn every_position_takes_only_its_own_kind_of_byte() {
        // Every ASCII byte in every position: a dash where the dashes go, lowercase hex
        // elsewhere. (Bytes from 0x80 up are not UTF-8 on their own; see the next test.)
        for position in 0..55 {
            for byte in 0..=127u8 {
                let mut value = VALID.as_bytes().to_vec();
                value[position] = byte;
                let value = String::from_utf8(value).expect("ASCII");
                let allowed = if [2, 35, 52].contains(&position) {
                    byte == b'-'
                } else {
                    byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
                };
                assert_eq!(parse_traceparent(&value).is_some(), allowed, "byte {byte:#04x} at {position}");
            }
        }
    }

    #[test]
    fn a_non_ascii_character_in_place_of_two_hex_digits_is_refused() {
        for position in (0..54).filter(|p| ![2, 35, 52].iter().any(|dash| *dash == *p || *dash == p + 1)) {
            let mut value = VALID.to_owned();
            value.replace_range(position..position + 2, "é");
            assert_eq!(value.len(), 55);
            assert!(parse_traceparent(&value).is_none(), "accepted {value:?}");
        }
    }

    #[test]
    fn rejects_forms_the_sdk_parser_accepts() {
        let cases = [
            // 30-hex trace id.
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            // Leading `+` in a field (Rust's from_str_radix takes it).
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "+0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // One-character version or flags.
            "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            // Trailing dash.
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            // All-zero ids.
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // Uppercase hex.
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0A",
            // Forbidden version, extra data on version 00, wrong separators, junk.
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "",
            "not a traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0é",
        ];
        for case in cases {
            assert!(!is_valid_traceparent(case), "accepted {case:?}");
        }
    }

    #[test]
    fn short_tracestate_is_kept_as_is() {
        assert_eq!(
            bound_tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            Bounded::Kept("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
    }

    #[test]
    fn tracestate_with_more_than_32_members_is_dropped() {
        let value = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert_eq!(bound_tracestate(&value), Bounded::Dropped);
        let value = (0..32).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert_eq!(bound_tracestate(&value), Bounded::Kept(value.as_str()));
    }

    #[test]
    fn long_tracestate_loses_long_members_first_then_from_the_right() {
        let long = format!("big={}", "x".repeat(200));
        let small: Vec<String> = (0..30).map(|i| format!("k{i:02}={}", "y".repeat(16))).collect();
        let value = format!("{},{long},{}", small[0], small[1..].join(","));
        let Bounded::Trimmed(trimmed) = bound_tracestate(&value) else { panic!("not trimmed") };
        assert!(trimmed.len() <= MAX_TRACESTATE_LEN);
        assert!(!trimmed.contains("big="));
        assert!(trimmed.starts_with("k00=") && trimmed.contains("k01="));
        assert!(!trimmed.contains("k29="), "rightmost members go first");
    }

    #[test]
    fn baggage_is_trimmed_by_whole_members() {
        let member = format!("k={}", "v".repeat(1000));
        let value = [member.as_str(); 10].join(",");
        let Bounded::Trimmed(trimmed) = bound_baggage(&value) else { panic!("not trimmed") };
        assert!(trimmed.len() <= MAX_BAGGAGE_LEN);
        assert!(trimmed.split(',').all(|m| m == member));
        assert_eq!(trimmed.split(',').count(), 8);
    }

    #[test]
    fn baggage_over_64_members_keeps_the_first_64() {
        let value = (0..100).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let Bounded::Trimmed(trimmed) = bound_baggage(&value) else { panic!("not trimmed") };
        assert_eq!(trimmed.split(',').count(), MAX_BAGGAGE_MEMBERS);
        assert!(trimmed.starts_with("k0=v,k1=v"));
    }

    #[test]
    fn baggage_whose_first_member_is_too_large_is_dropped() {
        let value = format!("k={}", "v".repeat(MAX_BAGGAGE_LEN));
        assert_eq!(bound_baggage(&value), Bounded::Dropped);
    }
}
