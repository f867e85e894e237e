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

/// Whether `value` is a `traceparent` the W3C spec lets a receiver continue.
///
/// Lowercase hex only, exact field widths, non-zero ids, version `ff` forbidden, and for version
/// `00` nothing after the flags. A higher version may append fields after a `-` (§3.2.4).
pub fn is_valid_traceparent(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() < TRACEPARENT_LEN {
        return false;
    }
    let (head, rest) = bytes.split_at(TRACEPARENT_LEN);
    let version = &head[0..2];
    let trace_id = &head[3..35];
    let parent_id = &head[36..52];
    let flags = &head[53..55];
    let dashes_ok = head[2] == b'-' && head[35] == b'-' && head[52] == b'-';
    let fields_ok = is_lower_hex(version)
        && version != b"ff"
        && is_lower_hex(trace_id)
        && !all_zero(trace_id)
        && is_lower_hex(parent_id)
        && !all_zero(parent_id)
        && is_lower_hex(flags);
    if !(dashes_ok && fields_ok) {
        return false;
    }
    match rest {
        [] => true,
        // Version 00 has exactly four fields; only a future version may carry more.
        _ if version == b"00" => false,
        [b'-', more @ ..] => !more.is_empty(),
        _ => false,
    }
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == b'0')
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
