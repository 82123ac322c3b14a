//! The `subtask` rules in force at one moment, indexed for a scheduling
//! round: which rule covers a task (a binary search over key ranges rather
//! than a scan of every rule per task) and which nodes a rule's targets
//! match (worked out once per rule rather than once per task and node).
//! The answers are exactly [`subtask_rule`]'s and [`Rule::matches`]'s.
//!
//! A valid rule set never has two active `subtask` rules whose key ranges
//! and tenants overlap (they would conflict), so the active rules of each
//! tenant, and those of every tenant, are disjoint ranges: the one that can
//! hold a key is the last one starting at or before it. A set where that
//! does not hold is searched rule by rule, as [`subtask_rule`] does.

use std::cell::OnceCell;
use std::collections::BTreeMap;

use super::rules::{Rule, RuleKind};
use crate::model::{NodeId, NodeView};

#[cfg(doc)]
use super::rules::subtask_rule;

/// The active `subtask` rules of a round, with the nodes they allow.
#[derive(Debug)]
pub struct SubtaskRules<'r> {
    active: Vec<&'r Rule>,
    /// Per tenant (`None`: rules for every tenant), indexes into `active`
    /// sorted by start key; `None` when some ranges overlap.
    ranges: Option<BTreeMap<Option<&'r str>, Vec<usize>>>,
    /// The ids (ascending) of the nodes carrying each label, and of all.
    labelled: BTreeMap<(&'r str, &'r str), Vec<NodeId>>,
    all: Vec<NodeId>,
    /// Per active rule, the ids of the nodes it matches (ascending), on
    /// first use.
    matching: Vec<OnceCell<Vec<NodeId>>>,
}

/// An active rule found for a task.
#[derive(Debug, Clone, Copy)]
pub struct Found<'r> {
    index: usize,
    pub rule: &'r Rule,
}

impl<'r> SubtaskRules<'r> {
    /// The `subtask` rules of `rules` active at `now_ms`, over `nodes`.
    pub fn new(rules: &'r [Rule], nodes: &'r [NodeView], now_ms: u64) -> Self {
        let active: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.kind == RuleKind::Subtask && r.is_active(now_ms))
            .collect();
        let mut ranges: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
        for (i, r) in active.iter().enumerate() {
            ranges.entry(r.tenant.as_deref()).or_default().push(i);
        }
        let mut disjoint = true;
        for list in ranges.values_mut() {
            list.sort_by(|a, b| active[*a].start_key.cmp(&active[*b].start_key));
            disjoint &= list.windows(2).all(|w| {
                let (a, b) = (active[w[0]], active[w[1]]);
                !a.end_key.is_empty() && a.end_key <= b.start_key
            });
        }
        let mut labelled: BTreeMap<(&str, &str), Vec<NodeId>> = BTreeMap::new();
        let mut all = Vec::with_capacity(nodes.len());
        for n in nodes {
            all.push(n.id);
            for (k, v) in &n.labels {
                labelled.entry((k, v)).or_default().push(n.id);
            }
        }
        for ids in labelled.values_mut().chain([&mut all]) {
            ids.sort_unstable();
            ids.dedup();
        }
        SubtaskRules {
            matching: active.iter().map(|_| OnceCell::new()).collect(),
            ranges: disjoint.then_some(ranges),
            active,
            labelled,
            all,
        }
    }

    /// The rule that pins a task of `tenant` with `key`, as
    /// [`subtask_rule`] finds it.
    pub fn rule_for(&self, key: &str, tenant: &str) -> Option<Found<'r>> {
        let found = |index: usize| Found {
            index,
            rule: self.active[index],
        };
        let Some(ranges) = &self.ranges else {
            return (0..self.active.len())
                .filter(|i| self.active[*i].covers(key, tenant))
                .min_by(|a, b| self.active[*a].name.cmp(&self.active[*b].name))
                .map(found);
        };
        let in_group = |group: Option<&str>| {
            let list = ranges.get(&group)?;
            let after = list.partition_point(|i| self.active[*i].start_key.as_str() <= key);
            let i = *list.get(after.checked_sub(1)?)?;
            self.active[i].contains_key(key).then_some(i)
        };
        [in_group(None), in_group(Some(tenant))]
            .into_iter()
            .flatten()
            .min_by(|a, b| self.active[*a].name.cmp(&self.active[*b].name))
            .map(found)
    }

    /// The ids of the nodes (up or not) the rule found matches, ascending:
    /// for each target, the nodes carrying all of its labels.
    pub fn nodes(&self, found: Found<'_>) -> &[NodeId] {
        self.matching[found.index].get_or_init(|| {
            let mut ids: Vec<NodeId> = Vec::new();
            for target in &found.rule.targets {
                let mut lists = Vec::with_capacity(target.len());
                for (k, v) in target {
                    lists.push(
                        self.labelled
                            .get(&(k.as_str(), v.as_str()))
                            .map_or(&[][..], Vec::as_slice),
                    );
                }
                lists.sort_by_key(|l| l.len());
                let Some((first, rest)) = lists.split_first() else {
                    ids.extend(&self.all);
                    continue;
                };
                ids.extend(
                    first
                        .iter()
                        .filter(|id| rest.iter().all(|l| l.binary_search(id).is_ok())),
                );
            }
            ids.sort_unstable();
            ids.dedup();
            ids
        })
    }

    /// Whether the rule found allows `node` (matches one of its targets).
    pub fn allows(&self, found: Found<'_>, node: &NodeView) -> bool {
        self.nodes(found).binary_search(&node.id).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_labels;
    use crate::sched::rules::{parse, subtask_rule};

    fn node(id: NodeId, labels: &str) -> NodeView {
        NodeView {
            id,
            labels: parse_labels(labels).unwrap(),
            scope: String::new(),
            slots: 1,
            up: true,
        }
    }

    fn rule(name: &str, start: &str, end: &str, extra: &str) -> String {
        format!(
            "[[rule]]\nname = \"{name}\"\nkind = \"subtask\"\nstart_key = \"{start}\"\nend_key = \"{end}\"\ntargets = [{{ zone = \"z{}\" }}]\n{extra}\n",
            name.len() % 3
        )
    }

    /// Same answers as the plain search, for keys around every boundary,
    /// both tenants and several times.
    fn agrees(rules: &[Rule], nodes: &[NodeView]) {
        let keys = [
            "", "a", "a/", "a/x", "b", "bz", "c", "m", "n", "nn", "o", "zz", "~",
        ];
        for now in [0, 1_500_000_000_000, 1_800_000_000_000, 4_000_000_000_000] {
            let index = SubtaskRules::new(rules, nodes, now);
            for key in keys {
                for tenant in ["default", "acme"] {
                    let want = subtask_rule(rules, key, tenant, now);
                    let got = index.rule_for(key, tenant);
                    assert_eq!(
                        got.map(|f| &f.rule.name),
                        want.map(|r| &r.name),
                        "{key} {tenant} {now}"
                    );
                    if let Some(f) = got {
                        for n in nodes {
                            assert_eq!(index.allows(f, n), f.rule.matches(n));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn finds_what_the_plain_search_finds() {
        let nodes: Vec<_> = (0..5)
            .map(|i| node(i, &format!("zone=z{},host=h{i}", i % 3)))
            .collect();
        let window = "start_time = \"2020-01-01T00:00:00Z\"\nend_time = \"2030-01-01T00:00:00Z\"";
        let later = "start_time = \"2030-01-01T00:00:00Z\"";
        let set = [
            rule("a", "a", "b", ""),
            rule("bb", "b", "c", window),
            rule("bbb", "b", "c", later),
            rule("acme", "c", "m", "tenant = \"acme\""),
            rule("m", "m", "n", ""),
            "[[rule]]\nname = \"multi\"\nkind = \"subtask\"\nstart_key = \"n\"\nend_key = \"o\"\n\
             targets = [{ zone = \"z1\", host = \"h4\" }, { zone = \"z2\" }, { host = \"h9\" }]\n"
                .to_string(),
        ]
        .concat();
        let rules = parse(&set).unwrap();
        agrees(&rules, &nodes);
        // An unbounded rule for every tenant overlapping a tenant's rule
        // (an invalid set, as the state machine would refuse it): the
        // plain search's answer still.
        let mut overlapping = rules.clone();
        overlapping[4].end_key.clear();
        overlapping[4].start_key = "a".into();
        agrees(&overlapping, &nodes);
        assert!(SubtaskRules::new(&overlapping, &nodes, 0).ranges.is_none());
        assert!(SubtaskRules::new(&rules, &nodes, 0).ranges.is_some());
    }
}
