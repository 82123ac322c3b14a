//! One scheduling round of the owner's pure part with placement rules and
//! the coordinator, on a simulated view: 100 nodes (10 zones), 100 subtask
//! rules over disjoint key ranges (a third of them with a time window),
//! 1,000 tasks with 10 pending subtasks each (10,000 pending): half of
//! them queued on a node (some off their rule's nodes), half waiting for
//! one. A round finds each task's rule and eligible nodes, admits,
//! assigns, and runs the coordinator (checkers and schedulers).
//!
//! `cargo bench -p stoker --bench coordinator` (aim: under 10 ms a round)

use std::collections::{BTreeMap, BTreeSet};

use criterion::{criterion_group, criterion_main, Criterion};
use stoker::model::{NodeView, Rank, TaskPlacement};
use stoker::sched::balance::Queued;
use stoker::sched::checkers::{Active, Liveness};
use stoker::sched::coordinator::{CoordTask, CoordView, Coordinator, Seen, SubtaskAt};
use stoker::sched::placement::{admit, assign, Candidate, EligibleIndex, Usage};
use stoker::sched::rule_index::SubtaskRules;
use stoker::sched::rules::{self, Rule};

const NODES: u64 = 100;
const RULES: usize = 100;
const TASKS: u64 = 1000;
const PER_TASK: u32 = 10;
const NOW: u64 = 1_800_000_000_000;

struct Sim {
    nodes: Vec<NodeView>,
    rules: Vec<Rule>,
    tasks: Vec<(TaskPlacement, String)>,
    /// Per task: its queued subtasks (ordinal, node) and unassigned ones.
    queued: BTreeMap<u64, Vec<(u32, u64)>>,
    unassigned: BTreeMap<u64, Vec<(u32, u32)>>,
}

fn sim() -> Sim {
    let nodes: Vec<NodeView> = (1..=NODES)
        .map(|id| NodeView {
            id,
            labels: BTreeMap::from([
                ("zone".to_string(), format!("z{}", id % 10)),
                ("host".to_string(), format!("h{id}")),
            ]),
            scope: String::new(),
            slots: 64,
            up: true,
        })
        .collect();
    let mut text = String::new();
    for i in 0..RULES {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nkind = \"subtask\"\nstart_key = \"k{i:03}\"\nend_key = \"k{i:03}~\"\ntargets = [{{ zone = \"z{}\" }}, {{ host = \"h{}\" }}]\n",
            i % 10,
            i + 1
        ));
        if i % 3 == 0 {
            text.push_str(
                "start_time = \"2020-01-01T00:00:00Z\"\nend_time = \"2099-01-01T00:00:00Z\"\n",
            );
        }
    }
    let rules = rules::parse(&text).expect("valid rules");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut tasks = Vec::new();
    let mut queued = BTreeMap::new();
    let mut unassigned = BTreeMap::new();
    for id in 1..=TASKS {
        let placement = TaskPlacement {
            rank: Rank {
                priority: 1 + rnd(1024) as u32,
                create_time_ms: id,
                id,
            },
            concurrency: 4,
            max_nodes: 0,
            scope: String::new(),
            selector: BTreeMap::new(),
        };
        // Keys spread over the rule ranges and beyond them.
        let key = format!("k{:03}/{id}", rnd(130));
        tasks.push((placement, key));
        let q: Vec<(u32, u64)> = (0..PER_TASK / 2).map(|o| (o, 1 + rnd(NODES))).collect();
        let u: Vec<(u32, u32)> = (PER_TASK / 2..PER_TASK).map(|o| (0, o)).collect();
        queued.insert(id, q);
        unassigned.insert(id, u);
    }
    Sim {
        nodes,
        rules,
        tasks,
        queued,
        unassigned,
    }
}

/// One round; returns how many assignments and operators it made.
fn round(s: &Sim, coordinator: &mut Coordinator) -> (usize, usize) {
    let mut candidates = Vec::with_capacity(s.tasks.len());
    let mut coord_tasks = Vec::with_capacity(s.tasks.len());
    let mut usage = Usage::default();
    let mut active: BTreeMap<u64, Vec<Active>> = BTreeMap::new();
    // As the owner does: the nodes and the rules in force indexed once.
    let eligibility = EligibleIndex::new(&s.nodes);
    let subtask_rules = SubtaskRules::new(&s.rules, &s.nodes, NOW);
    for (p, key) in &s.tasks {
        let id = p.rank.id;
        let rule = subtask_rules.rule_for(key, "default");
        let in_use: BTreeSet<u64> = s.queued[&id].iter().map(|(_, n)| *n).collect();
        let eligible = match rule {
            Some(r) => eligibility.eligible_among(p, subtask_rules.nodes(r), &in_use),
            None => eligibility.eligible(p, |_| true, &in_use),
        };
        for (o, n) in &s.queued[&id] {
            usage.add(id, *n);
            active.entry(*n).or_default().push(Active {
                subtask: SubtaskAt {
                    task: id,
                    step: 0,
                    ordinal: *o,
                    attempt: 1,
                },
                running: false,
                idempotent: true,
            });
        }
        coord_tasks.push(CoordTask {
            id,
            key: key.clone(),
            tenant: "default".into(),
            eligible: eligible.clone(),
            pinned_by: rule.map(|r| r.rule.name.clone()),
            queued: s.queued[&id]
                .iter()
                .map(|(o, n)| Queued {
                    subtask: SubtaskAt {
                        task: id,
                        step: 0,
                        ordinal: *o,
                        attempt: 1,
                    },
                    node: *n,
                })
                .collect(),
        });
        candidates.push(Candidate {
            placement: p.clone(),
            eligible,
        });
    }
    let admission = admit(&s.nodes, candidates);
    let view = CoordView {
        now_ms: NOW,
        nodes: s.nodes.clone(),
        used: usage.per_node.clone(),
        cpu: s.nodes.iter().map(|n| (n.id, 0.5)).collect(),
        tasks: coord_tasks,
        rules: s.rules.clone(),
        leader: 1,
        voters: BTreeSet::from([1, 2, 3]),
        liveness: s
            .nodes
            .iter()
            .map(|n| Liveness {
                id: n.id,
                up: true,
                worker: true,
                heard_ms: NOW,
            })
            .collect(),
        active,
    };
    let seen = |_: u64, _: u32, _: u32| -> Option<Seen> { None };
    let ops = coordinator.round(&view, &BTreeMap::new(), &seen);
    let assigned = assign(&s.nodes, &admission, &s.unassigned, &mut usage);
    (assigned.len(), ops.len())
}

fn bench(c: &mut Criterion) {
    let s = sim();
    let pending: usize = s.queued.values().map(Vec::len).sum::<usize>()
        + s.unassigned.values().map(Vec::len).sum::<usize>();
    assert_eq!(pending, 10_000);
    let (assigned, ops) = round(&s, &mut Coordinator::default());
    assert!(
        assigned > 0 && ops > 0,
        "the round does work: {assigned} {ops}"
    );
    let mut group = c.benchmark_group("coordinator");
    group.sample_size(20);
    group.bench_function("round_10k_subtasks_100_nodes_100_rules", |b| {
        // A fresh coordinator each time: no operator is in flight, so the
        // round does all of its work rather than stopping at the limits.
        b.iter(|| round(&s, &mut Coordinator::default()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
