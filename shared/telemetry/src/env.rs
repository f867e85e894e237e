//! Reading configuration from environment variables, once, with errors that name the variable.
//!
//! Every service's `Config::from_env()` and [`crate::TelemetryConfig::from_env`] read through an
//! [`Env`], so a test can hand them a map (the compose file's `environment:`, say) instead of
//! touching the process environment.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// The longest duration a variable may set (365 days): past some point a deadline added to the
/// clock overflows (a panic at shutdown) or a gRPC timeout cannot be written (a panic per call).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn at_most_max(name: &str, duration: Duration) -> Result<Duration, ConfigError> {
    if duration > MAX_DURATION {
        return Err(ConfigError::new(name, "must be at most 365 days"));
    }
    Ok(duration)
}

/// A bad configuration value: startup stops with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: String,
    /// What is wrong with it and what would be right.
    pub message: String,
}

impl ConfigError {
    /// A complaint about `variable`.
    pub fn new(variable: &str, message: impl Into<String>) -> Self {
        Self { variable: variable.to_owned(), message: message.into() }
    }
}

/// A variable lookup: the process environment or a map.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Where configuration values come from.
pub struct Env<'a> {
    lookup: Lookup<'a>,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Env")
    }
}

impl Env<'static> {
    /// The process environment.
    pub fn process() -> Self {
        Self { lookup: Box::new(|name| std::env::var(name).ok()) }
    }
}

impl<'a> Env<'a> {
    /// A fixed set of variables, as a test or a compose file would give them.
    pub fn from_map(map: &'a HashMap<String, String>) -> Self {
        Self { lookup: Box::new(move |name| map.get(name).cloned()) }
    }

    /// The value of `name`; an empty value counts as unset (as the OpenTelemetry spec says).
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty())
    }

    /// The value of `name`, or `default`.
    pub fn string_or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    /// `name` parsed as `T`, `None` when unset.
    pub fn parse<T>(&self, name: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(name)
            .map(|value| value.parse::<T>().map_err(|e| ConfigError::new(name, format!("cannot use {value:?}: {e}"))))
            .transpose()
    }

    /// `name` parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.parse(name)?.unwrap_or(default))
    }

    /// A duration in milliseconds of at least 1 ms and at most [`MAX_DURATION`], or `default_ms`
    /// when unset: for a deadline, which 0 would turn off.
    pub fn millis_or(&self, name: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        match self.parse_or(name, default_ms)? {
            0 => Err(ConfigError::new(name, "must be at least 1 ms")),
            ms => at_most_max(name, Duration::from_millis(ms)),
        }
    }

    /// A duration in seconds of at most [`MAX_DURATION`], or `default_secs` when unset.
    pub fn secs_or(&self, name: &str, default_secs: u64) -> Result<Duration, ConfigError> {
        at_most_max(name, Duration::from_secs(self.parse_or(name, default_secs)?))
    }

    /// A boolean: `true` or `false` in any letter case.
    pub fn flag_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) if value.eq_ignore_ascii_case("true") => Ok(true),
            Some(value) if value.eq_ignore_ascii_case("false") => Ok(false),
            Some(value) => Err(ConfigError::new(name, format!("expected true or false, got {value:?}"))),
        }
    }

    /// One of `choices` (case-insensitive), or `default` when unset.
    pub fn choice_or<T: Copy>(&self, name: &str, choices: &[(&str, T)], default: T) -> Result<T, ConfigError> {
        let Some(value) = self.get(name) else { return Ok(default) };
        choices
            .iter()
            .find(|(spelling, _)| spelling.eq_ignore_ascii_case(&value))
            .map(|(_, choice)| *choice)
            .ok_or_else(|| {
                let allowed: Vec<&str> = choices.iter().map(|(spelling, _)| *spelling).collect();
                ConfigError::new(name, format!("expected one of {}, got {value:?}", allowed.join(", ")))
            })
    }

    /// A comma-separated list, trimmed, without empty entries.
    pub fn list_or(&self, name: &str, default: &str) -> Vec<String> {
        self.string_or(name, default).split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_deadline_in_milliseconds_is_its_default_unless_set_and_never_zero() {
        let unset = env(&[]);
        assert_eq!(Env::from_map(&unset).millis_or("T_MS", 10_000), Ok(std::time::Duration::from_secs(10)));
        let set = env(&[("T_MS", "250")]);
        assert_eq!(Env::from_map(&set).millis_or("T_MS", 10_000), Ok(std::time::Duration::from_millis(250)));
        let zero = env(&[("T_MS", "0")]);
        let error = Env::from_map(&zero).millis_or("T_MS", 10_000).expect_err("0 turns the deadline off");
        assert!(error.to_string().contains("T_MS") && error.to_string().contains("at least 1 ms"), "{error}");
    }

    #[test]
    fn a_duration_is_at_most_a_year_in_either_unit() {
        let year = env(&[("T_MS", "31536000000"), ("T_SECS", "31536000")]);
        assert_eq!(Env::from_map(&year).millis_or("T_MS", 1), Ok(MAX_DURATION));
        assert_eq!(Env::from_map(&year).secs_or("T_SECS", 1), Ok(MAX_DURATION));
        let longer = env(&[("T_MS", "31536000001"), ("T_SECS", "18446744073709551615")]);
        for (name, result) in [
            ("T_MS", Env::from_map(&longer).millis_or("T_MS", 1)),
            ("T_SECS", Env::from_map(&longer).secs_or("T_SECS", 1)),
        ] {
            let error = result.expect_err("over a year");
            assert_eq!((error.variable.as_str(), error.message.as_str()), (name, "must be at most 365 days"));
        }
        let zero = env(&[("T_SECS", "0")]);
        assert_eq!(Env::from_map(&zero).secs_or("T_SECS", 5), Ok(Duration::ZERO), "no wait at all is a choice");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let map = env(&[("A", "  ")]);
        assert_eq!(Env::from_map(&map).string_or("A", "dflt"), "dflt");
    }

    #[test]
    fn a_bad_number_names_the_variable() {
        let map = env(&[("GATEWAY_BODY_LIMIT", "lots")]);
        let error = Env::from_map(&map).parse_or::<usize>("GATEWAY_BODY_LIMIT", 1).expect_err("bad");
        assert_eq!(error.variable, "GATEWAY_BODY_LIMIT");
        assert!(error.to_string().starts_with("GATEWAY_BODY_LIMIT: cannot use \"lots\""), "{error}");
    }

    #[test]
    fn choices_are_case_insensitive_and_strict() {
        let map = env(&[("MODE", "LINK"), ("BAD", "sideways")]);
        let env = Env::from_map(&map);
        let choices = [("parent", 1), ("link", 2)];
        assert_eq!(env.choice_or("MODE", &choices, 1), Ok(2));
        assert_eq!(env.choice_or("UNSET", &choices, 1), Ok(1));
        let error = env.choice_or("BAD", &choices, 1).expect_err("bad");
        assert!(error.message.contains("parent, link"), "{error}");
    }

    #[test]
    fn flags_accept_only_true_and_false() {
        let map = env(&[("T", "TRUE"), ("F", "false"), ("X", "yes")]);
        let env = Env::from_map(&map);
        assert_eq!(env.flag_or("T", false), Ok(true));
        assert_eq!(env.flag_or("F", true), Ok(false));
        assert!(env.flag_or("X", false).is_err());
    }
}
