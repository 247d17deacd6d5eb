//! The status page's `/api/v2/summary.json` (Atlassian Statuspage), read
//! into a small bounded summary: components, their status, active incidents
//! and when the page was checked.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::time::parse_rfc3339;

/// The most components, and the most incidents, kept from one page: a real
/// page lists a few dozen; a hostile one must not make the summary large.
pub const MAX_ENTRIES: usize = 256;

/// The most bytes of a name or status kept from the page.
pub const MAX_TEXT_LEN: usize = 200;

/// Why a status check or a probe did not give an answer. Recorded as the
/// outcome of the check (see [`StatusCheck`]); never a panic, never a
/// caller's error.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::health::HealthError;
/// assert_eq!(
///     HealthError::Timeout(Duration::from_secs(10)).to_string(),
///     "no answer within 10 s"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthError {
    /// The whole fetch (head and body) took longer than allowed.
    Timeout(Duration),
    /// The client failed (connection refused, reset...); its message.
    Transport(String),
    /// The page answered with a status other than 2xx.
    Status(u16),
    /// The body was longer than the cap, in bytes; it was not read further.
    BodyTooLarge(usize),
    /// The body is not a Statuspage summary; serde_json's message.
    Malformed(String),
    /// No tokio runtime to run the check on.
    NoRuntime,
    /// No status page is configured.
    NoStatusPage,
    /// A probe has no request to copy: no template was given and no call
    /// has been seen for the model yet.
    NoTemplate,
}

impl fmt::Display for HealthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(after) => write!(f, "no answer within {} s", after.as_secs()),
            Self::Transport(message) => write!(f, "transport error: {message}"),
            Self::Status(status) => write!(f, "answered with status {status}"),
            Self::BodyTooLarge(cap) => write!(f, "body larger than {cap} bytes"),
            Self::Malformed(message) => write!(f, "not a status page summary: {message}"),
            Self::NoRuntime => f.write_str("no tokio runtime to run on"),
            Self::NoStatusPage => f.write_str("no status page is configured"),
            Self::NoTemplate => f.write_str("no request to copy for the probe"),
        }
    }
}

impl std::error::Error for HealthError {}

/// One component of the page (the API, a model, the console...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Its name on the page, e.g. `Claude API (api.anthropic.com)`.
    pub name: String,
    /// `operational`, `degraded_performance`, `partial_outage`,
    /// `major_outage` or `under_maintenance`, as the page says it.
    pub status: String,
    /// When its status last changed, if the page says.
    pub updated_at: Option<SystemTime>,
}

impl Component {
    /// Whether the page says it works normally.
    ///
    /// ```
    /// use tower_overload::health::Component;
    /// let api = Component { name: "Claude API".into(), status: "operational".into(), updated_at: None };
    /// assert!(api.is_operational());
    /// ```
    pub fn is_operational(&self) -> bool {
        self.status == "operational"
    }
}

/// An incident the page lists as not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveIncident {
    /// Its title, e.g. `Elevated errors on Claude Opus 4.6`.
    pub name: String,
    /// `investigating`, `identified`, `monitoring`...
    pub status: String,
    /// `none`, `minor`, `major` or `critical`, if the page says.
    pub impact: Option<String>,
    /// When it started (else when it was posted), if the page says.
    pub started_at: Option<SystemTime>,
    /// The names of the components it affects.
    pub components: Vec<String>,
}

/// What the status page said at one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSummary {
    /// The page's overall indicator: `none`, `minor`, `major` or `critical`.
    pub indicator: String,
    /// The page's overall description, e.g. `All Systems Operational`.
    pub description: String,
    /// The components, in the page's order (group headers left out).
    pub components: Vec<Component>,
    /// The incidents that are not resolved.
    pub incidents: Vec<ActiveIncident>,
    /// When the page was read.
    pub checked_at: SystemTime,
}

/// The outcome of one status check: when it ran and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCheck {
    /// When the check ended.
    pub checked_at: SystemTime,
    /// The page, or why it could not be read.
    pub result: Result<std::sync::Arc<StatusSummary>, HealthError>,
}

#[derive(Deserialize)]
struct RawSummary {
    #[serde(default)]
    components: Vec<RawComponent>,
    #[serde(default)]
    incidents: Vec<RawIncident>,
    #[serde(default)]
    status: Option<RawStatus>,
}

#[derive(Deserialize)]
struct RawComponent {
    name: String,
    status: String,
    updated_at: Option<String>,
    #[serde(default)]
    group: bool,
}

#[derive(Deserialize)]
struct RawIncident {
    name: String,
    status: String,
    impact: Option<String>,
    started_at: Option<String>,
    created_at: Option<String>,
    #[serde(default)]
    components: Vec<RawIncidentComponent>,
}

#[derive(Deserialize)]
struct RawIncidentComponent {
    name: String,
}

#[derive(Deserialize)]
struct RawStatus {
    #[serde(default)]
    indicator: String,
    #[serde(default)]
    description: String,
}

/// At most [`MAX_TEXT_LEN`] bytes, cut on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn time(text: Option<&str>) -> Option<SystemTime> {
    parse_rfc3339(text?.as_bytes())
}

/// Statuses of an incident that is over; a summary should not list them,
/// but a page that does must not raise an alarm.
fn is_over(status: &str) -> bool {
    matches!(status, "resolved" | "postmortem" | "completed")
}

impl StatusSummary {
    /// Reads a Statuspage `summary.json` body checked at `checked_at`.
    /// Fields the page adds are ignored; missing lists are empty; anything
    /// that is not such a document is a [`HealthError::Malformed`].
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use tower_overload::health::StatusSummary;
    ///
    /// let page = br#"{"components":[{"name":"Claude API","status":"degraded_performance"}],
    ///                 "incidents":[],"status":{"indicator":"minor","description":"Minor Service Outage"}}"#;
    /// let summary = StatusSummary::parse(page, SystemTime::UNIX_EPOCH).unwrap();
    /// assert_eq!(summary.components[0].status, "degraded_performance");
    /// assert!(StatusSummary::parse(b"<html>", SystemTime::UNIX_EPOCH).is_err());
    /// ```
    pub fn parse(body: &[u8], checked_at: SystemTime) -> Result<Self, HealthError> {
        // serde would read a struct from an array too; a page is an object.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(HealthError::Malformed("not a JSON object".to_owned()));
        }
        let raw: RawSummary = serde_json::from_slice(body)
            .map_err(|error| HealthError::Malformed(bounded(error.to_string())))?;
        let components = raw
            .components
            .into_iter()
            .filter(|component| !component.group)
            .take(MAX_ENTRIES)
            .map(|component| Component {
                updated_at: time(component.updated_at.as_deref()),
                name: bounded(component.name),
                status: bounded(component.status),
            })
            .collect();
        let incidents = raw
            .incidents
            .into_iter()
            .filter(|incident| !is_over(&incident.status))
            .take(MAX_ENTRIES)
            .map(|incident| ActiveIncident {
                started_at: time(incident.started_at.as_deref())
                    .or_else(|| time(incident.created_at.as_deref())),
                name: bounded(incident.name),
                status: bounded(incident.status),
                impact: incident.impact.map(bounded),
                components: incident
                    .components
                    .into_iter()
                    .take(MAX_ENTRIES)
                    .map(|component| bounded(component.name))
                    .collect(),
            })
            .collect();
        let (indicator, description) = raw
            .status
            .map(|status| (bounded(status.indicator), bounded(status.description)))
            .unwrap_or_default();
        Ok(Self {
            indicator,
            description,
            components,
            incidents,
            checked_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_shaped_page_is_read() {
        let page = br#"{
          "page": {"id": "x", "name": "Claude", "url": "https://status.claude.com", "updated_at": "2026-11-23T12:05:00.000Z"},
          "components": [
            {"id": "a", "name": "Claude API (api.anthropic.com)", "status": "partial_outage",
             "updated_at": "2026-11-23T12:03:00.123Z", "group": false, "position": 1},
            {"id": "g", "name": "Models", "status": "operational", "group": true}
          ],
          "incidents": [
            {"id": "i", "name": "Elevated errors on Claude Opus 4.6", "status": "investigating",
             "impact": "major", "started_at": "2026-11-23T12:03:00Z", "created_at": "2026-11-23T12:04:00Z",
             "components": [{"id": "a", "name": "Claude API (api.anthropic.com)", "status": "partial_outage"}],
             "incident_updates": []},
            {"id": "j", "name": "Old", "status": "resolved", "impact": "minor"}
          ],
          "scheduled_maintenances": [],
          "status": {"indicator": "major", "description": "Partial System Outage"}
        }"#;
        let summary = StatusSummary::parse(page, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(summary.components.len(), 1, "group headers are left out");
        assert_eq!(
            summary.incidents.len(),
            1,
            "resolved incidents are left out"
        );
        let incident = &summary.incidents[0];
        assert_eq!(incident.impact.as_deref(), Some("major"));
        assert_eq!(
            incident.started_at,
            parse_rfc3339(b"2026-11-23T12:03:00Z"),
            "started_at wins over created_at"
        );
        assert_eq!(summary.indicator, "major");
    }

    #[test]
    fn hostile_pages_are_bounded_errors_or_bounded_values() {
        for body in [
            &b""[..],
            b"null",
            b"[]",
            b"{\"components\": 5}",
            b"\xff\xfe",
        ] {
            assert!(matches!(
                StatusSummary::parse(body, SystemTime::UNIX_EPOCH),
                Err(HealthError::Malformed(_))
            ));
        }
        let long = format!(
            r#"{{"components":[{{"name":"{}","status":"operational"}}]}}"#,
            "é".repeat(1000)
        );
        let summary = StatusSummary::parse(long.as_bytes(), SystemTime::UNIX_EPOCH).unwrap();
        assert!(summary.components[0].name.len() <= MAX_TEXT_LEN);
        let many = format!(
            r#"{{"components":[{}]}}"#,
            vec![r#"{"name":"c","status":"operational"}"#; 1000].join(",")
        );
        let summary = StatusSummary::parse(many.as_bytes(), SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(summary.components.len(), MAX_ENTRIES);
    }
}
