//! Which task gains or loses a running subtask when the node's concurrency
//! changes (DESIGN.md, "Resource manager"). Pure functions over a snapshot.
//!
//! - Growing picks first a task running fewer than its scheduled
//!   concurrency, then the one that has run shortest.
//! - Shrinking picks first a task running more than its scheduled
//!   concurrency, then the one that has run longest.
//!
//! Ties fall to the task id so the same snapshot always gives the same answer.

use std::cmp::Ordering;
use std::time::Duration;

/// One task's load on this node, as the choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLoad {
    pub task_id: String,
    /// Subtasks that hold fuel (not suspended).
    pub running: u32,
    /// Subtasks that are suspended or waiting to be admitted.
    pub waiting: u32,
    /// The concurrency the task was scheduled with on this node.
    pub scheduled: u32,
    /// How long the task has been running on this node.
    pub run_time: Duration,
}

/// The task that should get one more running subtask: among tasks with a
/// waiting subtask. `None` when nobody waits.
pub fn pick_grow(tasks: &[TaskLoad]) -> Option<usize> {
    tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.waiting > 0)
        .min_by(|(_, a), (_, b)| grow_order(a, b))
        .map(|(i, _)| i)
}

/// The task that should give up one running subtask: among tasks with a
/// running subtask. `None` when nothing runs.
pub fn pick_shrink(tasks: &[TaskLoad]) -> Option<usize> {
    tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.running > 0)
        .min_by(|(_, a), (_, b)| shrink_order(a, b))
        .map(|(i, _)| i)
}

/// `Less` means `a` grows before `b`.
fn grow_order(a: &TaskLoad, b: &TaskLoad) -> Ordering {
    let under = |t: &TaskLoad| t.running < t.scheduled;
    under(b)
        .cmp(&under(a))
        .then(a.run_time.cmp(&b.run_time))
        .then_with(|| a.task_id.cmp(&b.task_id))
}

/// `Less` means `a` shrinks before `b`.
fn shrink_order(a: &TaskLoad, b: &TaskLoad) -> Ordering {
    let over = |t: &TaskLoad| t.running > t.scheduled;
    over(b)
        .cmp(&over(a))
        .then(b.run_time.cmp(&a.run_time))
        .then_with(|| a.task_id.cmp(&b.task_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, running: u32, waiting: u32, scheduled: u32, secs: u64) -> TaskLoad {
        TaskLoad {
            task_id: id.into(),
            running,
            waiting,
            scheduled,
            run_time: Duration::from_secs(secs),
        }
    }

    #[test]
    fn grow_prefers_a_task_under_its_scheduled_concurrency() {
        let tasks = [
            task("a", 2, 1, 2, 1),   // at its concurrency, shortest
            task("b", 1, 1, 2, 100), // under, long-running
        ];
        assert_eq!(pick_grow(&tasks), Some(1));
    }

    #[test]
    fn grow_then_prefers_the_shortest_run() {
        let tasks = [
            task("a", 1, 1, 4, 30),
            task("b", 1, 1, 4, 10),
            task("c", 1, 1, 4, 20),
        ];
        assert_eq!(pick_grow(&tasks), Some(1));
        let all_at = [task("a", 2, 1, 2, 30), task("b", 3, 1, 3, 5)];
        assert_eq!(pick_grow(&all_at), Some(1));
    }

    #[test]
    fn grow_ignores_tasks_with_nothing_waiting() {
        let tasks = [task("a", 0, 0, 4, 0), task("b", 3, 1, 3, 50)];
        assert_eq!(pick_grow(&tasks), Some(1));
        assert_eq!(pick_grow(&[task("a", 1, 0, 4, 0)]), None);
        assert_eq!(pick_grow(&[]), None);
    }

    #[test]
    fn shrink_prefers_a_task_over_its_scheduled_concurrency() {
        let tasks = [
            task("a", 2, 0, 2, 100), // at its concurrency, longest
            task("b", 3, 0, 2, 1),   // over, short
        ];
        assert_eq!(pick_shrink(&tasks), Some(1));
    }

    #[test]
    fn shrink_then_prefers_the_longest_run() {
        let tasks = [
            task("a", 1, 0, 1, 30),
            task("b", 1, 0, 1, 90),
            task("c", 1, 0, 1, 60),
        ];
        assert_eq!(pick_shrink(&tasks), Some(1));
    }

    #[test]
    fn shrink_ignores_tasks_with_nothing_running() {
        let tasks = [task("a", 0, 3, 1, 500), task("b", 1, 0, 1, 1)];
        assert_eq!(pick_shrink(&tasks), Some(1));
        assert_eq!(pick_shrink(&[task("a", 0, 2, 1, 5)]), None);
    }

    #[test]
    fn ties_fall_to_the_task_id_whatever_the_input_order() {
        let a = task("a", 1, 1, 1, 7);
        let b = task("b", 1, 1, 1, 7);
        assert_eq!(pick_grow(&[a.clone(), b.clone()]), Some(0));
        assert_eq!(pick_grow(&[b.clone(), a.clone()]), Some(1));
        assert_eq!(pick_shrink(&[b.clone(), a.clone()]), Some(1));
    }

    /// Growing then shrinking the same snapshot never picks a task that the
    /// rule forbids: the grown task was the best candidate, and it is under
    /// its concurrency whenever any candidate was.
    #[test]
    fn grow_choice_is_under_scheduled_whenever_any_candidate_is() {
        for mask in 0u32..64 {
            let tasks: Vec<_> = (0..6)
                .map(|i| {
                    let running = (mask >> i) & 1;
                    task(
                        &format!("t{i}"),
                        running + 1,
                        1,
                        2 - (i % 2),
                        u64::from(i * 7 % 5),
                    )
                })
                .collect();
            let chosen = &tasks[pick_grow(&tasks).unwrap()];
            let any_under = tasks.iter().any(|t| t.running < t.scheduled);
            assert_eq!(chosen.running < chosen.scheduled, any_under, "mask {mask}");
            let shrunk = &tasks[pick_shrink(&tasks).unwrap()];
            let any_over = tasks.iter().any(|t| t.running > t.scheduled);
            assert_eq!(shrunk.running > shrunk.scheduled, any_over, "mask {mask}");
        }
    }
}
