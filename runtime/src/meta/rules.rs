//! Placement rules in the replicated state: `SetRules` replaces the whole
//! rule set after validating it again (deterministically: conflicts do not
//! depend on the clock), so a rejected set changes nothing.

use redb::{ReadTransaction, ReadableTable};

use super::tx::Tx;
use stoker_proto::meta::{Done, RuleRecord, SetRules};
use stoker_proto::Message;

use super::error::storage_err;
use super::records::{invalid, Applied};
use super::state_machine::SmTable;
use super::MetaError;
use crate::sched::rules;

/// Rules in force: rule name → [`RuleRecord`].
pub const RULES_TABLE: SmTable = redb::TableDefinition::new("sm_rules");
/// About the rule set: `source` → the text it was read from, `time` → 8
/// bytes big-endian ms of the `SetRules` that installed it.
pub const RULES_META_TABLE: SmTable = redb::TableDefinition::new("sm_rules_meta");

/// Largest rules source text kept, in bytes.
pub const MAX_RULES_SOURCE: usize = 1024 * 1024;

pub(crate) fn set_rules(txn: &Tx<'_>, c: &SetRules) -> Applied<Done> {
    if c.source.len() > MAX_RULES_SOURCE {
        return invalid(format!("rules source exceeds {MAX_RULES_SOURCE} bytes"));
    }
    if let Err(e) = rules::from_records(&c.rules) {
        return invalid(e.to_string());
    }
    let mut table = txn.table(RULES_TABLE)?;
    table.retain(|_, _| false)?;
    for r in &c.rules {
        table.insert(r.name.as_bytes(), r.encode_to_vec().as_slice())?;
    }
    let mut meta = txn.table(RULES_META_TABLE)?;
    meta.insert(b"source".as_slice(), c.source.as_bytes())?;
    meta.insert(b"time".as_slice(), c.time_ms.to_be_bytes().as_slice())?;
    Ok(Done {})
}

/// The rule set in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    /// By name.
    pub rules: Vec<RuleRecord>,
    pub source: String,
    /// When it was installed (ms since the epoch; 0 = never).
    pub time_ms: u64,
}

/// Reads the rule set in force.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn rule_set(path: &std::path::Path, txn: &ReadTransaction) -> Result<RuleSet, MetaError> {
    let err = |e: redb::Error| storage_err(path, e);
    let table = txn.open_table(RULES_TABLE).map_err(|e| err(e.into()))?;
    let mut out = RuleSet::default();
    for row in table.iter().map_err(|e| err(e.into()))? {
        let (_, v) = row.map_err(|e| err(e.into()))?;
        out.rules.push(
            RuleRecord::decode(v.value()).map_err(|_| MetaError::Corrupt {
                path: path.to_path_buf(),
                what: "bad rule record".into(),
            })?,
        );
    }
    let meta = txn
        .open_table(RULES_META_TABLE)
        .map_err(|e| err(e.into()))?;
    if let Some(v) = meta.get(b"source".as_slice()).map_err(|e| err(e.into()))? {
        out.source = String::from_utf8_lossy(v.value()).into_owned();
    }
    if let Some(v) = meta.get(b"time".as_slice()).map_err(|e| err(e.into()))? {
        out.time_ms = v
            .value()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or_default();
    }
    Ok(out)
}

/// Every cluster-wide setting (the `sm_config` table), for readers that
/// need several (the owner's coordinator limits and scheduler states).
///
/// # Errors
/// Storage failures.
pub fn cluster_config(
    path: &std::path::Path,
    txn: &ReadTransaction,
) -> Result<std::collections::BTreeMap<String, String>, MetaError> {
    let err = |e: redb::Error| storage_err(path, e);
    let table = txn
        .open_table(super::state_machine::CONFIG_TABLE)
        .map_err(|e| err(e.into()))?;
    let mut out = std::collections::BTreeMap::new();
    for row in table.iter().map_err(|e| err(e.into()))? {
        let (k, v) = row.map_err(|e| err(e.into()))?;
        out.insert(
            String::from_utf8_lossy(k.value()).into_owned(),
            String::from_utf8_lossy(v.value()).into_owned(),
        );
    }
    Ok(out)
}

/// The cluster settings named in `keys` or starting with one of
/// `prefixes`: what the owner reads every round, without reading every
/// setting (`config set` accepts any key, so the table may be large).
///
/// # Errors
/// Storage failures.
pub fn cluster_config_subset(
    path: &std::path::Path,
    txn: &ReadTransaction,
    keys: &[&str],
    prefixes: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, MetaError> {
    let err = |e: redb::Error| storage_err(path, e);
    let table = txn
        .open_table(super::state_machine::CONFIG_TABLE)
        .map_err(|e| err(e.into()))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut out = std::collections::BTreeMap::new();
    for key in keys {
        if let Some(v) = table.get(key.as_bytes()).map_err(|e| err(e.into()))? {
            out.insert((*key).to_string(), text(v.value()));
        }
    }
    for prefix in prefixes {
        for row in table
            .range(prefix.as_bytes()..)
            .map_err(|e| err(e.into()))?
        {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            if !k.value().starts_with(prefix.as_bytes()) {
                break;
            }
            out.insert(text(k.value()), text(v.value()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use stoker_proto::meta::command::Kind as C;

    use super::super::model_tests::Sm;
    use super::*;

    fn set(text: &str) -> C {
        let rules = rules::parse(text).unwrap();
        C::SetRules(SetRules {
            rules: rules.iter().map(rules::Rule::to_record).collect(),
            source: text.into(),
            time_ms: 42,
        })
    }

    const PIN: &str =
        "[[rule]]\nname = \"pin\"\nkind = \"subtask\"\nstart_key = \"a\"\nend_key = \"m\"\ntargets = [{ zone = \"z1\" }]\n";

    #[test]
    fn a_rule_set_replaces_the_last_and_a_bad_one_changes_nothing() {
        let mut sm = Sm::new();
        sm.ok(set(PIN));
        let got = sm.read(rule_set);
        assert_eq!(got.rules.len(), 1);
        assert_eq!((got.source.as_str(), got.time_ms), (PIN, 42));
        // Conflicting records (they pass no parser, so build them by hand)
        // are refused by the state machine itself, naming both rules.
        let mut twice = rules::parse(PIN).unwrap()[0].to_record();
        twice.name = "pin2".into();
        let mut records = got.rules.clone();
        records.push(twice);
        let e = sm.rejected(C::SetRules(SetRules {
            rules: records,
            source: String::new(),
            time_ms: 43,
        }));
        assert!(e.contains("pin") && e.contains("pin2"), "{e}");
        let mut bad = got.rules[0].clone();
        bad.kind = "region".into();
        sm.rejected(C::SetRules(SetRules {
            rules: vec![bad],
            source: String::new(),
            time_ms: 44,
        }));
        assert_eq!(sm.read(rule_set), got);
        // Snapshots carry the rules.
        let txn = sm.s.read().unwrap();
        let snap = super::super::state_machine::export(&txn).unwrap();
        assert!(snap
            .tables
            .iter()
            .any(|t| t.name == "sm_rules" && t.entries.len() == 1));
        drop(txn);
        // An empty set removes every rule.
        sm.ok(set(""));
        assert!(sm.read(rule_set).rules.is_empty());
    }

    #[test]
    fn a_config_subset_holds_the_named_keys_and_prefixes_only() {
        let mut sm = Sm::new();
        for (k, v) in [
            ("scheduler.hot-node", "paused"),
            ("scheduler.balance-subtask", "running"),
            ("schedulerz", "x"),
            ("scheduler", "y"),
            ("subtask-schedule-limit", "2"),
            ("bench/1/2", "3"),
        ] {
            sm.ok(C::SetConfig(stoker_proto::meta::SetConfig {
                key: k.into(),
                value: v.into(),
            }));
        }
        let got = sm.read(|p, t| {
            cluster_config_subset(
                p,
                t,
                &["subtask-schedule-limit", "leader-schedule-limit"],
                &["scheduler."],
            )
        });
        let keys: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "scheduler.balance-subtask",
                "scheduler.hot-node",
                "subtask-schedule-limit"
            ]
        );
        assert_eq!(got["scheduler.hot-node"], "paused");
        assert_eq!(sm.read(cluster_config).len(), 6);
    }
}
