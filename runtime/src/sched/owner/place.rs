//! The placement half of a round: admission, preemption, the coordinator's
//! operators (down nodes taken down, subtasks moved, leadership
//! transferred) and assignment, proposed as replicated commands.

use std::collections::{BTreeMap, BTreeSet};

use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{command_result, AssignSubtask, MarkNodeDown, RequeueSubtask, SubtaskRef};
use tracing::{info, warn};

use super::commands::{propose_batch, propose_for, requeue};
use super::view::{accepts_work, is_state, parse_sub, ClusterView};
use super::Owner;
use crate::meta::queries;
use crate::model::{NodeId, NodeView, SubtaskState, TaskId};
use crate::sched::balance::Queued;
use crate::sched::checkers::Liveness;
use crate::sched::coordinator::{CoordTask, CoordView, OpKind, Operator, Step, SubtaskAt};
use crate::sched::fair_share::admit_fair;
use crate::sched::placement::{assign, preempt, Candidate, EligibleIndex, Held, Usage};
use crate::sched::rule_index::SubtaskRules;

impl Owner {
    /// Admission, preemption, the coordinator (down nodes, rules,
    /// balancing, leadership) and assignment.
    pub(super) async fn place(&mut self, view: &ClusterView, now: u64) {
        let nodes: Vec<NodeView> = view.nodes.iter().map(queries::node_view).collect();
        let eligibility = EligibleIndex::new(&nodes);
        let subtask_rules = SubtaskRules::new(&view.rules, &nodes, now);
        let mut candidates = Vec::new();
        let mut eligible_of = BTreeMap::new();
        let mut pinned_by = BTreeMap::new();
        for t in view.tasks.iter().filter(|t| accepts_work(t)) {
            let in_use: BTreeSet<NodeId> = t
                .subtasks
                .iter()
                .filter(|s| s.node != 0 && !SubtaskState::is_finished(parse_sub(s)))
                .map(|s| s.node)
                .collect();
            let placement = queries::task_placement(&t.task);
            let rule = subtask_rules.rule_for(&t.task.key, &t.task.tenant);
            let eligible = match rule {
                Some(r) => eligibility.eligible_among(&placement, subtask_rules.nodes(r), &in_use),
                None => eligibility.eligible(&placement, |_| true, &in_use),
            };
            if let Some(r) = rule {
                pinned_by.insert(t.task.id, r.rule.name.clone());
            }
            eligible_of.insert(t.task.id, eligible.clone());
            candidates.push(Candidate {
                placement,
                eligible,
            });
        }
        let tenant_of: BTreeMap<TaskId, String> = view
            .tasks
            .iter()
            .map(|t| (t.task.id, t.task.tenant.clone()))
            .collect();
        let concurrency: BTreeMap<TaskId, u32> = candidates
            .iter()
            .map(|c| (c.placement.rank.id, c.placement.concurrency))
            .collect();
        let slots: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (n.id, n.slots)).collect();
        let admission = admit_fair(&nodes, candidates, &tenant_of, &view.tenants).with_queue(
            self.ctx.config.queue_per_slot,
            |task, node| {
                let c = concurrency.get(&task).copied().unwrap_or(0);
                c.min(slots.get(&node).copied().unwrap_or(0))
            },
        );
        // Every subtask holding a slot, whatever its task's state.
        let mut held = Vec::new();
        let mut usage = Usage::default();
        let up: BTreeSet<NodeId> = nodes.iter().filter(|n| n.up).map(|n| n.id).collect();
        for t in &view.tasks {
            for s in t
                .subtasks
                .iter()
                .filter(|s| s.node != 0 && up.contains(&s.node))
            {
                let st = parse_sub(s);
                if st == SubtaskState::Pending || st == SubtaskState::Running {
                    usage.add(t.task.id, s.node);
                    if accepts_work(t) {
                        held.push(Held {
                            task: t.task.id,
                            subtask: (s.step, s.ordinal, s.attempt, st),
                            node: s.node,
                            started_ms: if st == SubtaskState::Running {
                                s.start_time_ms
                            } else {
                                u64::MAX
                            },
                            idempotent: s.idempotent,
                        });
                    }
                }
            }
        }
        let mut commands = Vec::new();
        let mut taken_back = BTreeSet::new();
        // A pinned task's subtasks off its rule's nodes are not preempted:
        // running ones finish where they are (the rule does not throw work
        // away), queued ones are moved by the coordinator's rule checker
        // when a rule node has room (within the operator limits).
        let preemptible: Vec<_> = held
            .iter()
            .filter(|h| {
                !pinned_by.contains_key(&h.task)
                    || eligible_of
                        .get(&h.task)
                        .is_some_and(|e: &Vec<NodeId>| e.contains(&h.node))
            })
            .copied()
            .collect();
        for h in preempt(&admission, &preemptible) {
            let (step, ordinal, attempt, _) = h.subtask;
            taken_back.insert((h.task, step, ordinal));
            // A queued subtask of a step that is not idempotent is taken
            // back only if it has not started since this view.
            commands.push(requeue(
                h.task,
                (step, ordinal, attempt),
                "preempted",
                !h.idempotent,
                now,
            ));
        }
        // The coordinator: queued (assigned, not started) subtasks move by
        // its operators; leadership follows the leader rules.
        let coord = CoordView {
            now_ms: now,
            used: usage.per_node.clone(),
            cpu: view
                .nodes
                .iter()
                .filter_map(|n| n.load.as_ref()?.cpu.map(|c| (n.id, c as f32)))
                .collect(),
            tasks: eligible_of
                .iter()
                .map(|(task, eligible)| {
                    let t = view.tasks.iter().find(|t| t.task.id == *task);
                    CoordTask {
                        id: *task,
                        key: t.map(|t| t.task.key.clone()).unwrap_or_default(),
                        tenant: t.map(|t| t.task.tenant.clone()).unwrap_or_default(),
                        eligible: eligible.clone(),
                        pinned_by: pinned_by.get(task).cloned(),
                        queued: held
                            .iter()
                            .filter(|h| h.task == *task && h.subtask.3 == SubtaskState::Pending)
                            .filter(|h| !taken_back.contains(&(h.task, h.subtask.0, h.subtask.1)))
                            .map(|h| Queued {
                                subtask: SubtaskAt {
                                    task: h.task,
                                    step: h.subtask.0,
                                    ordinal: h.subtask.1,
                                    attempt: h.subtask.2,
                                },
                                node: h.node,
                            })
                            .collect(),
                    }
                })
                .collect(),
            rules: view.rules.clone(),
            leader: self.ctx.node.id(),
            voters: view
                .nodes
                .iter()
                .filter(|n| n.scheduler && n.up)
                .map(|n| n.id)
                .collect(),
            nodes,
            liveness: view
                .nodes
                .iter()
                .map(|n| Liveness {
                    id: n.id,
                    up: n.up,
                    worker: n.worker,
                    heard_ms: n.last_heartbeat_ms.max(self.since_ms),
                })
                .collect(),
            active: view.active(),
        };
        let seen = |task: TaskId, step: u32, ordinal: u32| {
            view.watched.get(&(task, step, ordinal)).copied()
        };
        // What workers reported in their heartbeats since the last round.
        let reports = std::mem::take(&mut self.ctx.board.lock().expect("board lock").reports);
        self.coordinator.reports(&reports);
        let operators = self.coordinator.round(&coord, &view.config, &seen);
        let mut moves = Vec::new();
        let mut downs = Vec::new();
        for op in operators {
            if op.kind == OpKind::NodeDown {
                downs.push(op);
                continue;
            }
            for step in &op.steps {
                match *step {
                    Step::MoveSubtask { subtask, to, .. } => {
                        usage.add(subtask.task, to);
                        moves.push((op.id, subtask, to));
                    }
                    Step::TransferLeader { to, .. } => {
                        info!(to, operator = op.id, "moving leadership by placement rule");
                        let node = self.ctx.node.clone();
                        tokio::spawn(async move {
                            if let Err(e) = node.transfer_leader(to).await {
                                warn!(to, error = %e, "leader transfer failed");
                            }
                        });
                    }
                    Step::MarkNodeDown { .. } | Step::TakeBack { .. } => {}
                }
            }
        }
        let mut nodes = coord.nodes;
        // A node going down takes no new work; its work comes back first.
        for step in downs.iter().flat_map(|op| &op.steps) {
            if let Step::MarkNodeDown { node, .. } = step {
                nodes
                    .iter_mut()
                    .filter(|n| n.id == *node)
                    .for_each(|n| n.up = false);
            }
        }
        self.take_down(downs, now).await;
        // Freed slots are reused in the next round, once the requeues are
        // applied; assignment now works with what is certainly free.
        let mut pending: BTreeMap<TaskId, Vec<(u32, u32)>> = BTreeMap::new();
        for t in view.tasks.iter().filter(|t| accepts_work(t)) {
            let list: Vec<(u32, u32)> = t
                .subtasks
                .iter()
                .filter(|s| {
                    is_state(s, SubtaskState::Pending) && s.node == 0 && s.retry_after_ms <= now
                })
                .map(|s| (s.step, s.ordinal))
                .collect();
            if !list.is_empty() {
                pending.insert(t.task.id, list);
            }
        }
        for (task, (step, ordinal), node) in assign(&nodes, &admission, &pending, &mut usage) {
            commands.push(C::AssignSubtask(AssignSubtask {
                subtask: Some(SubtaskRef {
                    task_id: task,
                    step,
                    ordinal,
                }),
                node,
            }));
        }
        let n = commands.len();
        commands.extend(moves.iter().map(|(_, s, to)| {
            C::AssignSubtask(AssignSubtask {
                subtask: Some(SubtaskRef {
                    task_id: s.task,
                    step: s.step,
                    ordinal: s.ordinal,
                }),
                node: *to,
            })
        }));
        let moved = propose_batch(&self.ctx.node, commands).await.split_off(n);
        for ((op, s, _), result) in moves.iter().zip(moved) {
            // Refused: it started (or went away) first, nothing moved. A
            // move that landed at another attempt than the next one raced
            // with a requeue: the step the nodes would get is wrong.
            let attempt = result.and_then(|r| match r.kind {
                Some(command_result::Kind::SubtaskState(st)) if r.error.is_empty() => {
                    Some(st.attempt)
                }
                _ => None,
            });
            if attempt != Some(s.attempt + 1) {
                self.coordinator.operators.cancel(*op);
            }
        }
        self.coordinator.publish(&self.ctx.board, &view.config);
    }

    /// Carries out the down-node checker's operators: marks silent nodes
    /// down, then takes their subtasks back (requeued, or failed for steps
    /// that are not idempotent). The commands are idempotent and fenced by
    /// attempt; an operator whose commands were not all applied is found
    /// again by the checker next round.
    async fn take_down(&mut self, ops: Vec<Operator>, now: u64) {
        for op in ops {
            let mut applied = true;
            for step in &op.steps {
                if let Step::MarkNodeDown { node, silent_ms } = *step {
                    info!(node, silent_ms, operator = op.id, "node is down");
                    let mark = C::MarkNodeDown(MarkNodeDown { id: node });
                    applied &= propose_for(&self.ctx.node, mark).await.is_some();
                }
            }
            let takes = op.steps.iter().filter_map(|step| match *step {
                Step::TakeBack { subtask, node, .. } => Some(C::RequeueSubtask(RequeueSubtask {
                    subtask: Some(SubtaskRef {
                        task_id: subtask.task,
                        step: subtask.step,
                        ordinal: subtask.ordinal,
                    }),
                    attempt: subtask.attempt,
                    or_fail: true,
                    reason: format!("node {node} is down"),
                    time_ms: now,
                    only_pending: false,
                })),
                _ => None,
            });
            let results = propose_batch(&self.ctx.node, takes.collect()).await;
            applied &= results.iter().all(Option::is_some);
            self.coordinator.operators.carried_out(op.id, applied);
        }
    }
}
