//! The verdict: incident, local pressure, capacity event or unknown, decided
//! from the last status check and the last probe (pure).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::status::StatusSummary;

/// What is behind a model's overloads, as far as the monitor knows.
///
/// The guides' two first steps for a 529 decide it: the status page (a
/// declared incident), then one small controlled request to the same model
/// (it succeeds: the problem is your traffic; it is overloaded too: a broader
/// capacity event).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_overload::health::Verdict;
///
/// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(12 * 3600 + 5 * 60 + 10);
/// let verdict = Verdict::LocalPressure { probe_at: at };
/// assert_eq!(
///     verdict.to_string(),
///     "a minimal probe to the same model succeeded at 12:05:10Z: this looks like local pressure, lower your concurrency"
/// );
/// assert_eq!(Verdict::Unknown.to_string(), "");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The status page declares a problem that covers the model: wait, do
    /// not hammer the API, switch models if continuity matters.
    Incident {
        /// The incident's title, or the name of the component that is not
        /// operational.
        component: String,
        /// The incident's status (`investigating`...) or the component's
        /// (`degraded_performance`...), as the page says it.
        status: String,
        /// When it started, if the page says.
        since: Option<SystemTime>,
        /// When the page was read.
        checked_at: SystemTime,
    },
    /// A minimal request to the same model succeeded while calls failed: the
    /// overloads come from your own traffic; lower your concurrency.
    LocalPressure {
        /// When the probe's answer came.
        probe_at: SystemTime,
    },
    /// The minimal request was overloaded too and the page declares
    /// nothing (yet): a capacity event beyond your traffic, often minutes
    /// before an incident is posted. Wait, or switch models.
    CapacityEvent {
        /// When the probe's answer came.
        probe_at: SystemTime,
    },
    /// Nothing is known: no check or probe yet, or none recent, or they
    /// found nothing wrong.
    Unknown,
}

impl Verdict {
    /// Whether the page declares a problem for the model.
    ///
    /// ```
    /// use tower_overload::health::Verdict;
    /// assert!(!Verdict::Unknown.is_incident());
    /// ```
    pub fn is_incident(&self) -> bool {
        matches!(self, Self::Incident { .. })
    }

    /// Whether nothing is known.
    ///
    /// ```
    /// use tower_overload::health::Verdict;
    /// assert!(Verdict::Unknown.is_unknown());
    /// ```
    pub fn is_unknown(&self) -> bool {
        matches!(self, Self::Unknown)
    }

    /// What to do, in a few words; `None` when nothing is known.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use tower_overload::health::Verdict;
    /// let event = Verdict::CapacityEvent { probe_at: SystemTime::UNIX_EPOCH };
    /// assert!(event.advice().unwrap().starts_with("wait"));
    /// ```
    pub fn advice(&self) -> Option<&'static str> {
        Some(match self {
            Self::Incident { .. } | Self::CapacityEvent { .. } => {
                "wait and do not hammer the API, or fall back to another model if continuity matters"
            }
            Self::LocalPressure { .. } => "lower your concurrency",
            Self::Unknown => return None,
        })
    }
}

/// The sentence an error appends after `; ` (empty for [`Verdict::Unknown`]).
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incident {
                component,
                status,
                since,
                checked_at,
            } => {
                write!(f, "status page: '{component}'")?;
                if !status.is_empty() {
                    write!(f, " ({})", status.replace('_', " "))?;
                }
                if let Some(since) = since {
                    write!(f, " since {}", Utc::minutes(*since, *checked_at))?;
                }
                write!(f, " (checked {})", Utc::seconds(*checked_at))
            }
            Self::LocalPressure { probe_at } => write!(
                f,
                "a minimal probe to the same model succeeded at {}: this looks like local pressure, lower your concurrency",
                Utc::seconds(*probe_at)
            ),
            Self::CapacityEvent { probe_at } => write!(
                f,
                "a minimal probe to the same model was overloaded too at {}: this looks like a capacity event beyond your traffic",
                Utc::seconds(*probe_at)
            ),
            Self::Unknown => Ok(()),
        }
    }
}

/// A UTC time of day, `12:03Z` or `12:05:10Z`, with the date in front when
/// it is not the day of the time it is shown beside.
struct Utc {
    at: SystemTime,
    seconds: bool,
    beside: Option<SystemTime>,
}

impl Utc {
    fn seconds(at: SystemTime) -> Self {
        Self {
            at,
            seconds: true,
            beside: None,
        }
    }

    fn minutes(at: SystemTime, beside: SystemTime) -> Self {
        Self {
            at,
            seconds: false,
            beside: Some(beside),
        }
    }
}

fn unix_secs(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// (year, month, day) of a count of days since 1970-01-01 (the inverse of
/// the era-based `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = unix_secs(self.at);
        let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        if let Some(beside) = self.beside
            && unix_secs(beside).div_euclid(86_400) != days
        {
            let (year, month, day) = civil_from_days(days);
            write!(f, "{year:04}-{month:02}-{day:02}T")?;
        }
        write!(f, "{:02}:{:02}", of_day / 3600, of_day % 3600 / 60)?;
        if self.seconds {
            write!(f, ":{:02}", of_day % 60)?;
        }
        f.write_str("Z")
    }
}

/// The model families the page names in its incidents and components.
const FAMILIES: [&str; 3] = ["opus", "sonnet", "haiku"];

/// Whether a text of the page (an incident's title, a component's name)
/// covers `model`: it names the model's family, or it names the API and no
/// family at all. Text that names only other families, or other products
/// (claude.ai, the console), does not.
fn covers(text: &str, family: Option<&str>) -> bool {
    // Whole words: "rapid" does not name the API, "opuses" no family.
    let text = text.to_ascii_lowercase();
    let names = |word: &str| {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|token| token == word)
    };
    let named: Vec<&str> = FAMILIES.iter().copied().filter(|f| names(f)).collect();
    if named.is_empty() {
        return names("api");
    }
    family.is_some_and(|family| named.contains(&family))
}

/// What the status page says about `model`, if anything: an unresolved
/// incident that covers it (its title, or one of its components, names the
/// model's family, or the API without a family), else a component that
/// covers it and is not operational.
///
/// ```
/// use std::time::SystemTime;
/// use tower_overload::health::{StatusSummary, Verdict, page_verdict};
///
/// let page = br#"{"incidents":[{"name":"Elevated errors on Claude Sonnet","status":"identified"}]}"#;
/// let summary = StatusSummary::parse(page, SystemTime::UNIX_EPOCH).unwrap();
/// assert!(page_verdict("claude-sonnet-4-6", &summary).unwrap().is_incident());
/// assert_eq!(page_verdict("claude-opus-4-6", &summary), None, "another family");
/// ```
pub fn page_verdict(model: &str, summary: &StatusSummary) -> Option<Verdict> {
    let lower = model.to_ascii_lowercase();
    let family = FAMILIES
        .iter()
        .copied()
        .find(|f| lower.split('-').any(|part| part == *f));
    let incident = summary.incidents.iter().find(|incident| {
        covers(&incident.name, family)
            || incident
                .components
                .iter()
                .any(|component| covers(component, family))
    });
    if let Some(incident) = incident {
        return Some(Verdict::Incident {
            component: incident.name.clone(),
            status: incident.status.clone(),
            since: incident.started_at,
            checked_at: summary.checked_at,
        });
    }
    summary
        .components
        .iter()
        .find(|component| !component.is_operational() && covers(&component.name, family))
        .map(|component| Verdict::Incident {
            component: component.name.clone(),
            status: component.status.clone(),
            since: component.updated_at,
            checked_at: summary.checked_at,
        })
}

/// What a probe's answer was.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeOutcome {
    /// The minimal request succeeded.
    Succeeded,
    /// The minimal request was overloaded (529, or an overload in another form).
    Overloaded,
    /// Anything else (another status, a transport error, a timeout): it says
    /// nothing about capacity.
    Failed(super::HealthError),
}

/// One probe and when its answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRecord {
    /// When the answer came.
    pub at: SystemTime,
    /// What it was.
    pub outcome: ProbeOutcome,
}

/// The verdict for `model` from the page (when recent) and the model's last
/// probe (when recent): a declared incident first, then the probe's answer.
///
/// ```
/// use std::time::SystemTime;
/// use tower_overload::health::{ProbeOutcome, ProbeRecord, Verdict, decide};
///
/// let probe = ProbeRecord { at: SystemTime::UNIX_EPOCH, outcome: ProbeOutcome::Overloaded };
/// assert_eq!(decide("claude-opus-4-6", None, Some(&probe)), Verdict::CapacityEvent { probe_at: probe.at });
/// assert_eq!(decide("claude-opus-4-6", None, None), Verdict::Unknown);
/// ```
pub fn decide(model: &str, page: Option<&StatusSummary>, probe: Option<&ProbeRecord>) -> Verdict {
    if let Some(verdict) = page.and_then(|summary| page_verdict(model, summary)) {
        return verdict;
    }
    match probe {
        Some(ProbeRecord {
            at,
            outcome: ProbeOutcome::Succeeded,
        }) => Verdict::LocalPressure { probe_at: *at },
        Some(ProbeRecord {
            at,
            outcome: ProbeOutcome::Overloaded,
        }) => Verdict::CapacityEvent { probe_at: *at },
        _ => Verdict::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn times_are_utc_and_dated_only_when_another_day() {
        let checked = at(20_000 * 86_400 + 12 * 3600 + 5 * 60 + 10);
        assert_eq!(Utc::seconds(checked).to_string(), "12:05:10Z");
        let since = at(20_000 * 86_400 + 12 * 3600 + 3 * 60 + 59);
        assert_eq!(Utc::minutes(since, checked).to_string(), "12:03Z");
        let yesterday = at(19_999 * 86_400 + 23 * 3600);
        // Day 19,999 since the epoch is 2024-10-03.
        assert_eq!(
            Utc::minutes(yesterday, checked).to_string(),
            "2024-10-03T23:00Z"
        );
        assert_eq!(Utc::seconds(UNIX_EPOCH).to_string(), "00:00:00Z");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn families_and_products_are_told_apart() {
        assert!(covers("Elevated errors on Claude Opus 4.6", Some("opus")));
        assert!(!covers("Elevated errors on Claude Opus 4.6", Some("haiku")));
        assert!(covers("Claude API (api.anthropic.com)", Some("haiku")));
        assert!(covers("Elevated API error rates", None));
        assert!(!covers("claude.ai login issues", Some("opus")));
        assert!(
            !covers("Claude Opus", None),
            "an unknown model's family is not guessed"
        );
        assert!(
            !covers("Rapidly rising errors on claude.ai", None),
            "whole words only"
        );
    }
}
