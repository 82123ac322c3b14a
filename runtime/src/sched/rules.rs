//! Placement rules: the `rules.toml` file, its validation and conflict
//! detection, and which rule applies to a task and which nodes it allows.
//! Pure functions of the rules, a cluster view and a time, so the owner,
//! the state machine (which validates again when it applies a rule set) and
//! `rules show` all reach the same verdicts.
//!
//! A file is a list of `[[rule]]` tables:
//!
//! ```toml
//! [[rule]]
//! name = "rush-hour"
//! kind = "subtask"            # or "leader"
//! start_key = "bike/"         # task keys in [start_key, end_key)
//! end_key = "bike0"           # empty or absent: unbounded
//! tenant = "acme"             # optional: only this tenant's tasks
//! targets = [{ zone = "z1" }, { host = "h7" }]
//! start_time = "2026-11-21T07:00:00Z"   # optional window, RFC 3339
//! end_time = "2026-11-21T09:00:00+01:00"
//! ```
//!
//! Conflicts (the whole file is rejected, naming both rules): two rules of
//! the same kind whose key ranges, tenants and windows overlap; a `leader`
//! and a `subtask` rule that overlap the same way but whose targets no node
//! can satisfy together (no target of one is compatible with a target of
//! the other). Rules whose windows do not overlap never conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stoker_proto::meta::{LabelSet, RuleRecord};

use crate::model::{NodeId, NodeView};

/// Most rules one file may hold.
pub const MAX_RULES: usize = 10_000;
/// Longest rule name, key, tenant, label key or value, in bytes.
const MAX_FIELD: usize = 1024;

/// What a rule places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// Raft leadership, hence the owner.
    Leader,
    /// The subtasks of tasks whose key is in the range.
    Subtask,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Leader => "leader",
            RuleKind::Subtask => "subtask",
        }
    }
}

impl std::str::FromStr for RuleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "leader" => Ok(RuleKind::Leader),
            "subtask" => Ok(RuleKind::Subtask),
            other => Err(format!("unknown kind {other:?} (leader or subtask)")),
        }
    }
}

/// A set of labels; a node matches it when it carries all of them.
pub type Target = BTreeMap<String, String>;

/// One placement rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub kind: RuleKind,
    pub start_key: String,
    /// Empty: unbounded.
    pub end_key: String,
    /// `None`: every tenant.
    pub tenant: Option<String>,
    pub targets: Vec<Target>,
    /// The window [start_ms, end_ms), ms since the Unix epoch.
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
}

/// Why a rule file or rule set is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("rules file is not valid TOML: {0}")]
    Syntax(String),
    #[error("rule {rule:?}: {why}")]
    Invalid { rule: String, why: String },
    #[error("rules {a:?} and {b:?} conflict: {why}")]
    Conflict { a: String, b: String, why: String },
}

impl RulesError {
    /// The rules the error names.
    pub fn rules(&self) -> Vec<&str> {
        match self {
            RulesError::Syntax(_) => Vec::new(),
            RulesError::Invalid { rule, .. } => vec![rule],
            RulesError::Conflict { a, b, .. } => vec![a, b],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    kind: String,
    #[serde(default)]
    start_key: String,
    #[serde(default)]
    end_key: String,
    tenant: Option<String>,
    #[serde(default)]
    targets: Vec<Target>,
    start_time: Option<String>,
    end_time: Option<String>,
}

/// Parses and validates a rules file (an empty file has no rules).
///
/// # Errors
/// Bad TOML, an invalid rule (named), or two conflicting rules (named).
pub fn parse(text: &str) -> Result<Vec<Rule>, RulesError> {
    let file: File = toml::from_str(text).map_err(|e| RulesError::Syntax(e.to_string()))?;
    let mut rules = Vec::with_capacity(file.rule.len());
    for raw in file.rule {
        let invalid = |why: String| RulesError::Invalid {
            rule: raw.name.clone(),
            why,
        };
        let kind = raw.kind.parse().map_err(invalid)?;
        let time = |field: &str, v: &Option<String>| -> Result<Option<u64>, RulesError> {
            v.as_deref()
                .map(|s| parse_rfc3339(s).map_err(|e| invalid(format!("{field}: {e}"))))
                .transpose()
        };
        let start_ms = time("start_time", &raw.start_time)?;
        let end_ms = time("end_time", &raw.end_time)?;
        rules.push(Rule {
            name: raw.name,
            kind,
            start_key: raw.start_key,
            end_key: raw.end_key,
            tenant: raw.tenant,
            targets: raw.targets,
            start_ms,
            end_ms,
        });
    }
    validate(&rules)?;
    Ok(rules)
}

/// Parses an RFC 3339 time (`2026-11-21T07:00:00Z`, fractional seconds and
/// `±HH:MM` offsets allowed) into ms since the Unix epoch.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time (e.g. 2026-11-21T07:00:00Z)");
    let (local, offset_secs): (&str, i64) = if let Some(l) = s.strip_suffix(['Z', 'z']) {
        (l, 0)
    } else {
        let split = s.len().checked_sub(6).ok_or_else(bad)?;
        let (l, off) = s.split_at_checked(split).ok_or_else(bad)?;
        let sign = match off.as_bytes().first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(bad()),
        };
        let (h, m) = off[1..].split_once(':').ok_or_else(bad)?;
        let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 || off.len() != 6 {
            return Err(bad());
        }
        (l, sign * (h * 3600 + m * 60))
    };
    if local.len() < 19 || !matches!(local.as_bytes()[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let t = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let ms = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_millis() as i64;
    u64::try_from(ms - offset_secs * 1000).map_err(|_| bad())
}

/// Formats ms since the Unix epoch as RFC 3339 (UTC).
pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn check_field(rule: &str, what: &str, v: &str) -> Result<(), RulesError> {
    if v.len() > MAX_FIELD {
        return Err(RulesError::Invalid {
            rule: rule.into(),
            why: format!("{what} is longer than {MAX_FIELD} bytes"),
        });
    }
    Ok(())
}

/// Checks each rule and every pair of rules.
///
/// # Errors
/// The first invalid rule, or the first conflicting pair (in file order).
pub fn validate(rules: &[Rule]) -> Result<(), RulesError> {
    if rules.len() > MAX_RULES {
        return Err(RulesError::Syntax(format!(
            "{} rules; at most {MAX_RULES}",
            rules.len()
        )));
    }
    let mut names = BTreeSet::new();
    for r in rules {
        let invalid = |why: &str| RulesError::Invalid {
            rule: r.name.clone(),
            why: why.into(),
        };
        if r.name.trim().is_empty() {
            return Err(invalid("name must not be empty"));
        }
        check_field(&r.name, "name", &r.name)?;
        check_field(&r.name, "start_key", &r.start_key)?;
        check_field(&r.name, "end_key", &r.end_key)?;
        if !names.insert(r.name.as_str()) {
            return Err(invalid("name is used by more than one rule"));
        }
        if !r.end_key.is_empty() && r.end_key <= r.start_key {
            return Err(invalid("end_key must be after start_key (or empty)"));
        }
        if let Some(t) = &r.tenant {
            if t.is_empty() {
                return Err(invalid("tenant must not be empty when given"));
            }
            check_field(&r.name, "tenant", t)?;
        }
        if r.targets.is_empty() {
            return Err(invalid("targets must list at least one label table"));
        }
        for t in &r.targets {
            if t.is_empty() {
                return Err(invalid("a target label table must not be empty"));
            }
            for (k, v) in t {
                if k.is_empty() || v.is_empty() {
                    return Err(invalid("label keys and values must not be empty"));
                }
                check_field(&r.name, "label", k)?;
                check_field(&r.name, "label", v)?;
            }
        }
        if let (Some(s), Some(e)) = (r.start_ms, r.end_ms) {
            if e <= s {
                return Err(invalid("end_time must be after start_time"));
            }
        }
    }
    for (i, a) in rules.iter().enumerate() {
        for b in &rules[i + 1..] {
            if let Some(why) = conflict(a, b) {
                return Err(RulesError::Conflict {
                    a: a.name.clone(),
                    b: b.name.clone(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Why two rules cannot both be in force, if they cannot.
pub fn conflict(a: &Rule, b: &Rule) -> Option<String> {
    if !a.overlaps(b) {
        return None;
    }
    if a.kind == b.kind {
        return Some(format!(
            "both are {} rules over overlapping key ranges and time windows",
            a.kind.as_str()
        ));
    }
    let satisfiable = a
        .targets
        .iter()
        .any(|x| b.targets.iter().any(|y| compatible(x, y)));
    if satisfiable {
        None
    } else {
        Some("a leader rule and a subtask rule overlap but no node can match both targets".into())
    }
}

/// Whether one node can carry both label sets (they agree on every key
/// they share).
pub fn compatible(a: &Target, b: &Target) -> bool {
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}

/// Whether `node` matches one of `targets`.
pub fn matches(labels: &BTreeMap<String, String>, targets: &[Target]) -> bool {
    targets
        .iter()
        .any(|t| t.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Where a rule's window stands at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Before,
    Open,
    After,
}

impl Rule {
    /// Whether a task key falls in [start_key, end_key).
    pub fn contains_key(&self, key: &str) -> bool {
        key >= self.start_key.as_str() && (self.end_key.is_empty() || key < self.end_key.as_str())
    }

    /// Whether the rule covers tasks of `tenant`.
    pub fn covers_tenant(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// Whether the rule applies to a task (key and tenant), ignoring time.
    pub fn covers(&self, key: &str, tenant: &str) -> bool {
        self.contains_key(key) && self.covers_tenant(tenant)
    }

    pub fn window(&self, now_ms: u64) -> Window {
        if self.start_ms.is_some_and(|s| now_ms < s) {
            Window::Before
        } else if self.end_ms.is_some_and(|e| now_ms >= e) {
            Window::After
        } else {
            Window::Open
        }
    }

    pub fn is_active(&self, now_ms: u64) -> bool {
        self.window(now_ms) == Window::Open
    }

    /// Whether the two rules can apply to one task at one time: key ranges,
    /// tenants and windows all overlap.
    pub fn overlaps(&self, other: &Rule) -> bool {
        let keys = range_overlap(
            &self.start_key,
            &self.end_key,
            &other.start_key,
            &other.end_key,
        );
        let tenants = match (&self.tenant, &other.tenant) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let windows = self.start_ms.unwrap_or(0) < other.end_ms.unwrap_or(u64::MAX)
            && other.start_ms.unwrap_or(0) < self.end_ms.unwrap_or(u64::MAX);
        keys && tenants && windows
    }

    pub fn matches(&self, node: &NodeView) -> bool {
        matches(&node.labels, &self.targets)
    }

    /// The replicated record of the rule.
    pub fn to_record(&self) -> RuleRecord {
        RuleRecord {
            name: self.name.clone(),
            kind: self.kind.as_str().into(),
            start_key: self.start_key.clone(),
            end_key: self.end_key.clone(),
            tenant: self.tenant.clone().unwrap_or_default(),
            targets: self
                .targets
                .iter()
                .map(|t| LabelSet { labels: t.clone() })
                .collect(),
            start_ms: self.start_ms.unwrap_or(0),
            end_ms: self.end_ms.unwrap_or(0),
        }
    }

    /// A rule from its record.
    ///
    /// # Errors
    /// An unknown kind.
    pub fn from_record(r: &RuleRecord) -> Result<Rule, RulesError> {
        Ok(Rule {
            name: r.name.clone(),
            kind: r.kind.parse().map_err(|why| RulesError::Invalid {
                rule: r.name.clone(),
                why,
            })?,
            start_key: r.start_key.clone(),
            end_key: r.end_key.clone(),
            tenant: (!r.tenant.is_empty()).then(|| r.tenant.clone()),
            targets: r.targets.iter().map(|t| t.labels.clone()).collect(),
            start_ms: (r.start_ms != 0).then_some(r.start_ms),
            end_ms: (r.end_ms != 0).then_some(r.end_ms),
        })
    }
}

fn range_overlap(a_start: &str, a_end: &str, b_start: &str, b_end: &str) -> bool {
    (b_end.is_empty() || a_start < b_end) && (a_end.is_empty() || b_start < a_end)
}

/// Rules converted from their records and validated as a set.
///
/// # Errors
/// As [`validate`].
pub fn from_records(records: &[RuleRecord]) -> Result<Vec<Rule>, RulesError> {
    let rules = records
        .iter()
        .map(Rule::from_record)
        .collect::<Result<Vec<_>, _>>()?;
    validate(&rules)?;
    Ok(rules)
}

/// The active `subtask` rule that applies to a task at `now_ms`. Valid rule
/// sets have at most one (same-kind overlaps conflict); the first by name
/// wins otherwise.
pub fn subtask_rule<'r>(
    rules: &'r [Rule],
    key: &str,
    tenant: &str,
    now_ms: u64,
) -> Option<&'r Rule> {
    rules
        .iter()
        .filter(|r| r.kind == RuleKind::Subtask && r.is_active(now_ms) && r.covers(key, tenant))
        .min_by(|a, b| a.name.cmp(&b.name))
}

/// The nodes (up or not) that match a rule.
pub fn matching_nodes(rule: &Rule, nodes: &[NodeView]) -> Vec<NodeId> {
    nodes
        .iter()
        .filter(|n| rule.matches(n))
        .map(|n| n.id)
        .collect()
}

/// A task as rule evaluation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskKey<'a> {
    pub key: &'a str,
    pub tenant: &'a str,
    /// Subtasks waiting to run (pending: unassigned, or queued on a node).
    pub waiting: u32,
}

/// Where a rule stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum RuleStatus {
    /// In force and satisfiable.
    Active,
    /// Its window has not opened yet.
    Waiting(String),
    /// Its window has closed.
    Expired,
    /// In force but cannot be carried out now.
    Blocked(String),
}

impl RuleStatus {
    pub fn name(&self) -> &'static str {
        match self {
            RuleStatus::Active => "active",
            RuleStatus::Waiting(_) => "waiting",
            RuleStatus::Expired => "expired",
            RuleStatus::Blocked(_) => "blocked",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            RuleStatus::Waiting(r) | RuleStatus::Blocked(r) => r,
            RuleStatus::Active | RuleStatus::Expired => "",
        }
    }
}

impl fmt::Display for RuleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason() {
            "" => f.write_str(self.name()),
            r => write!(f, "{}: {r}", self.name()),
        }
    }
}

/// What a rule's status depends on besides the rule and the time.
#[derive(Debug, Clone, Default)]
pub struct StatusView<'a> {
    pub nodes: &'a [NodeView],
    /// Slots in use per node.
    pub used: BTreeMap<NodeId, u32>,
    /// Unfinished tasks that accept work.
    pub tasks: Vec<TaskKey<'a>>,
    /// The Raft leader, if known.
    pub leader: Option<NodeId>,
    /// Scheduler (voter) nodes: only they can lead.
    pub schedulers: BTreeSet<NodeId>,
}

/// A rule's status at `now_ms`.
pub fn status(rule: &Rule, view: &StatusView<'_>, now_ms: u64) -> RuleStatus {
    match rule.window(now_ms) {
        Window::Before => {
            return RuleStatus::Waiting(format!(
                "window opens at {}",
                format_time(rule.start_ms.unwrap_or(0))
            ))
        }
        Window::After => return RuleStatus::Expired,
        Window::Open => {}
    }
    let up: Vec<&NodeView> = view
        .nodes
        .iter()
        .filter(|n| n.up && rule.matches(n))
        .collect();
    match rule.kind {
        RuleKind::Leader => {
            let candidates: Vec<NodeId> = view
                .nodes
                .iter()
                .filter(|n| view.schedulers.contains(&n.id) && rule.matches(n))
                .map(|n| n.id)
                .collect();
            if candidates.is_empty() {
                RuleStatus::Blocked("no scheduler node matches the targets".into())
            } else if view.leader.is_some_and(|l| !candidates.contains(&l)) {
                RuleStatus::Blocked(format!(
                    "leadership is moving to one of nodes {candidates:?}"
                ))
            } else {
                RuleStatus::Active
            }
        }
        RuleKind::Subtask => {
            if up.is_empty() {
                return RuleStatus::Blocked("no up node matches the targets".into());
            }
            let waiting: u32 = view
                .tasks
                .iter()
                .filter(|t| rule.covers(t.key, t.tenant))
                .map(|t| t.waiting)
                .sum();
            let free: u32 = up
                .iter()
                .map(|n| {
                    n.slots
                        .saturating_sub(view.used.get(&n.id).copied().unwrap_or(0))
                })
                .sum();
            if waiting > 0 && free == 0 {
                let ids: Vec<NodeId> = up.iter().map(|n| n.id).collect();
                RuleStatus::Blocked(format!(
                    "matching nodes {ids:?} are full; {waiting} subtasks wait for room"
                ))
            } else {
                RuleStatus::Active
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_labels;

    fn node(id: NodeId, slots: u32, labels: &str) -> NodeView {
        NodeView {
            id,
            labels: parse_labels(labels).unwrap(),
            scope: String::new(),
            slots,
            up: true,
        }
    }

    /// One `[[rule]]` table.
    fn rule(name: &str, kind: &str, start: &str, end: &str, targets: &str, window: &str) -> String {
        format!(
            "[[rule]]\nname = {name:?}\nkind = {kind:?}\nstart_key = {start:?}\nend_key = {end:?}\ntargets = {targets}\n{window}\n"
        )
    }

    const T1: &str = "start_time = \"2026-01-01T08:00:00Z\"\nend_time = \"2026-01-01T10:00:00Z\"";
    const T2: &str = "start_time = \"2026-01-01T09:00:00Z\"\nend_time = \"2026-01-01T11:00:00Z\"";
    const T3: &str = "start_time = \"2026-01-01T10:00:00Z\"\nend_time = \"2026-01-01T12:00:00Z\"";

    fn z(n: u32) -> String {
        format!("{{ zone = \"z{n}\", host = \"h{n}\" }}")
    }

    fn zs(ns: &[u32]) -> String {
        format!(
            "[{}]",
            ns.iter().map(|n| z(*n)).collect::<Vec<_>>().join(", ")
        )
    }

    /// The three groups of the pluggable scheduler proposal, as (case,
    /// file, Ok(rule count) or the rules an error names).
    #[test]
    fn proposal_test_groups() {
        // (case, file, Ok(rules accepted) or Err(the rules the error names))
        type Case = (&'static str, String, Result<usize, Vec<&'static str>>);
        let cases: Vec<Case> = vec![
            // 1. No conflict: both kinds, disjoint ranges, one or many targets.
            (
                "no conflict",
                [
                    rule("leader0", "leader", "1773", "3943", &zs(&[3]), ""),
                    rule("leader1", "leader", "3943", "5743", &zs(&[1, 5]), ""),
                    rule("sub0", "subtask", "5743", "6973", &zs(&[1, 2, 3]), ""),
                    rule("sub1", "subtask", "6973", "9973", &zs(&[4, 5]), ""),
                ]
                .concat(),
                Ok(4),
            ),
            // 2a. Same kind, overlapping ranges, overlapping windows.
            (
                "same kind, windows overlap",
                [
                    rule("leader0", "leader", "1", "6", &zs(&[2]), T1),
                    rule("leader1", "leader", "5", "9", &zs(&[3]), T2),
                ]
                .concat(),
                Err(vec!["leader0", "leader1"]),
            ),
            (
                "same kind subtask, no windows",
                [
                    rule("a", "subtask", "", "", &zs(&[2]), ""),
                    rule("b", "subtask", "m", "", &zs(&[2]), ""),
                ]
                .concat(),
                Err(vec!["a", "b"]),
            ),
            // 2b. Same kind, overlapping ranges, windows apart: accepted.
            (
                "same kind, windows apart",
                [
                    rule("sub0", "subtask", "1", "6", &zs(&[2]), T1),
                    rule("sub1", "subtask", "5", "9", &zs(&[3]), T3),
                ]
                .concat(),
                Ok(2),
            ),
            // 2c. Cross kind, overlapping, targets disjoint.
            (
                "cross kind, targets cannot both hold",
                [
                    rule("leader0", "leader", "5743", "9973", &zs(&[2]), ""),
                    rule("sub0", "subtask", "5743", "6973", &zs(&[1, 2, 3]), ""),
                    rule("sub1", "subtask", "6973", "9973", &zs(&[3, 4, 5]), ""),
                ]
                .concat(),
                Err(vec!["leader0", "sub1"]),
            ),
            // 3. Reconcilable cross-kind overlap: the leader targets are
            // within both subtask rules' targets.
            (
                "cross kind, reconcilable",
                [
                    rule("leader0", "leader", "1773", "3943", &zs(&[3]), ""),
                    rule("leader1", "leader", "5743", "9973", &zs(&[1, 5]), ""),
                    rule("sub0", "subtask", "5743", "6973", &zs(&[1, 2, 3]), ""),
                    rule("sub1", "subtask", "6973", "9973", &zs(&[3, 4, 5]), ""),
                ]
                .concat(),
                Ok(4),
            ),
            (
                "cross kind, compatible partial labels",
                [
                    rule("l", "leader", "", "", "[{ zone = \"z1\" }]", ""),
                    rule(
                        "s",
                        "subtask",
                        "a",
                        "b",
                        "[{ zone = \"z1\", disk = \"ssd\" }]",
                        "",
                    ),
                ]
                .concat(),
                Ok(2),
            ),
            (
                "cross kind disjoint but windows apart",
                [
                    rule("l", "leader", "", "", &zs(&[1]), T1),
                    rule("s", "subtask", "", "", &zs(&[2]), T3),
                ]
                .concat(),
                Ok(2),
            ),
            (
                "different tenants never overlap",
                [
                    rule("a", "subtask", "", "", &zs(&[1]), "tenant = \"x\""),
                    rule("b", "subtask", "", "", &zs(&[2]), "tenant = \"y\""),
                ]
                .concat(),
                Ok(2),
            ),
            (
                "a tenant rule overlaps an all-tenant rule",
                [
                    rule("a", "subtask", "", "", &zs(&[1]), "tenant = \"x\""),
                    rule("b", "subtask", "", "", &zs(&[2]), ""),
                ]
                .concat(),
                Err(vec!["a", "b"]),
            ),
            ("empty file", String::new(), Ok(0)),
        ];
        for (case, text, want) in cases {
            let got = parse(&text);
            match (&got, &want) {
                (Ok(rules), Ok(n)) => assert_eq!(rules.len(), *n, "{case}"),
                (Err(e), Err(names)) => {
                    assert!(matches!(e, RulesError::Conflict { .. }), "{case}: {e}");
                    assert_eq!(&e.rules(), names, "{case}: {e}");
                    for n in names {
                        assert!(e.to_string().contains(n), "{case}: {e}");
                    }
                }
                _ => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn invalid_rules_are_named() {
        let cases: Vec<(String, &str, &str)> =
            vec![
            (rule("r", "region", "", "", &zs(&[1]), ""), "r", "unknown kind"),
            (rule("r", "subtask", "b", "a", &zs(&[1]), ""), "r", "end_key"),
            (rule("r", "subtask", "", "", "[]", ""), "r", "targets"),
            (rule("r", "subtask", "", "", "[{}]", ""), "r", "must not be empty"),
            (
                rule("r", "subtask", "", "", &zs(&[1]), "start_time = \"tomorrow\""),
                "r",
                "start_time",
            ),
            (
                rule(
                    "r",
                    "subtask",
                    "",
                    "",
                    &zs(&[1]),
                    "start_time = \"2026-01-01T10:00:00Z\"\nend_time = \"2026-01-01T09:00:00Z\"",
                ),
                "r",
                "end_time",
            ),
            (
                [
                    rule("d", "subtask", "a", "b", &zs(&[1]), ""),
                    rule("d", "subtask", "c", "d", &zs(&[1]), ""),
                ]
                .concat(),
                "d",
                "more than one",
            ),
            (rule("", "subtask", "", "", &zs(&[1]), ""), "", "name"),
        ];
        for (text, name, why) in cases {
            match parse(&text) {
                Err(e @ RulesError::Invalid { .. }) => {
                    assert_eq!(e.rules(), vec![name], "{text}");
                    assert!(e.to_string().contains(why), "{e} lacks {why}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[[rule]]\nname = 1"),
            Err(RulesError::Syntax(_))
        ));
        assert!(matches!(
            parse(&format!(
                "{}colour = \"red\"\n",
                rule("r", "subtask", "", "", &zs(&[1]), "")
            )),
            Err(RulesError::Syntax(_))
        ));
    }

    #[test]
    fn rfc3339_times() {
        let utc = parse_rfc3339("2026-01-01T08:00:00Z").unwrap();
        assert_eq!(utc, 1_767_254_400_000);
        assert_eq!(parse_rfc3339("2026-01-01T09:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_rfc3339("2026-01-01T07:30:00-00:30").unwrap(), utc);
        assert_eq!(
            parse_rfc3339("2026-01-01T08:00:00.250Z").unwrap(),
            utc + 250
        );
        for bad in [
            "2026-01-01",
            "2026-01-01T08:00:00",
            "08:00",
            "2026-01-01T08:00:00+1:00",
            "",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
        assert_eq!(format_time(utc), "2026-01-01T08:00:00Z");
    }

    #[test]
    fn evaluation_picks_the_rule_in_force() {
        let rules = parse(
            &[
                rule("morning", "subtask", "a", "m", &zs(&[1]), T1),
                rule("noon", "subtask", "a", "m", &zs(&[2]), T3),
                rule("acme", "subtask", "m", "", &zs(&[3]), "tenant = \"acme\""),
            ]
            .concat(),
        )
        .unwrap();
        let at = |s: &str| parse_rfc3339(s).unwrap();
        let name = |key: &str, tenant: &str, t: u64| {
            subtask_rule(&rules, key, tenant, t).map(|r| r.name.clone())
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            name("b", "default", at("2026-01-01T08:30:00Z")),
            some("morning")
        );
        assert_eq!(
            name("b", "default", at("2026-01-01T10:00:00Z")),
            some("noon")
        );
        assert_eq!(name("b", "default", at("2026-01-01T12:00:00Z")), None);
        assert_eq!(name("m", "default", at("2026-01-01T08:30:00Z")), None);
        assert_eq!(name("zz", "acme", 0), some("acme"));
        assert_eq!(name("m", "acme", 0), some("acme"));
        let nodes = [
            node(1, 2, "zone=z1,host=h1"),
            node(2, 2, "zone=z1"),
            node(3, 2, "zone=z3,host=h3"),
        ];
        assert_eq!(matching_nodes(&rules[0], &nodes), vec![1]);
        assert_eq!(matching_nodes(&rules[2], &nodes), vec![3]);
    }

    #[test]
    fn status_says_why() {
        let rules = parse(
            &[
                rule("pin", "subtask", "a", "m", &zs(&[1]), T1),
                rule("own", "leader", "m", "", &zs(&[2]), ""),
            ]
            .concat(),
        )
        .unwrap();
        let at = |s: &str| parse_rfc3339(s).unwrap();
        let nodes = vec![node(1, 2, "zone=z1,host=h1"), node(2, 2, "zone=z2,host=h2")];
        let mut view = StatusView {
            nodes: &nodes,
            tasks: vec![TaskKey {
                key: "b",
                tenant: "default",
                waiting: 3,
            }],
            leader: Some(1),
            schedulers: BTreeSet::from([1]),
            ..Default::default()
        };
        let (pin, own) = (&rules[0], &rules[1]);
        assert!(
            matches!(status(pin, &view, at("2026-01-01T07:00:00Z")), RuleStatus::Waiting(r) if r.contains("08:00:00Z"))
        );
        assert_eq!(
            status(pin, &view, at("2026-01-01T10:00:00Z")),
            RuleStatus::Expired
        );
        let open = at("2026-01-01T09:00:00Z");
        assert_eq!(status(pin, &view, open), RuleStatus::Active);
        view.used.insert(1, 2);
        let s = status(pin, &view, open);
        assert!(
            matches!(&s, RuleStatus::Blocked(r) if r.contains("full") && r.contains("3 subtasks")),
            "{s}"
        );
        view.tasks[0].waiting = 0;
        assert_eq!(status(pin, &view, open), RuleStatus::Active);
        assert!(
            matches!(status(own, &view, open), RuleStatus::Blocked(r) if r.contains("no scheduler"))
        );
        view.schedulers.insert(2);
        assert!(matches!(status(own, &view, open), RuleStatus::Blocked(r) if r.contains("moving")));
        view.leader = Some(2);
        assert_eq!(status(own, &view, open), RuleStatus::Active);
        let down: Vec<NodeView> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.up = false;
                n
            })
            .collect();
        view.nodes = &down;
        assert!(
            matches!(status(pin, &view, open), RuleStatus::Blocked(r) if r.contains("no up node"))
        );
    }

    #[test]
    fn records_round_trip() {
        let rules = parse(
            &[
                rule("pin", "subtask", "a", "m", &zs(&[1, 2]), T1),
                rule("own", "leader", "", "", &zs(&[1]), "tenant = \"acme\""),
            ]
            .concat(),
        )
        .unwrap();
        let records: Vec<RuleRecord> = rules.iter().map(Rule::to_record).collect();
        assert_eq!(from_records(&records).unwrap(), rules);
        let mut bad = records.clone();
        bad[1].kind = "region".into();
        assert!(from_records(&bad).is_err());
    }
}
