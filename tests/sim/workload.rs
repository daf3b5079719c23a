//! Workloads drawn from the seed: DAGs (fan-out, joins, every trigger rule, branch tasks with
//! several upstreams, tasks that return follow-ups with joins downstream, pools, `max_active`,
//! `max_active_tasks`, `max_active_runs`, retries with delays, timeouts), and the task that runs
//! in every one of their tasks: it records what it did in the history, and what it does in a try
//! (how long, success or failure, a branch's choice, follow-ups) depends only on the seed, the
//! run, the task and the try.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::{Dag, DagRegistry, FollowUp, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TriggerRule};

use crate::rng::{Rng, hash};
use crate::world::{Proc, World};

/// The version of every DAG before its first reload; a reload makes `sim-2`, `sim-3`, ...
pub const FIRST_VERSION: &str = "sim-1";

/// One task of a generated DAG, as plain data (the model reads it too).
#[derive(Debug, Clone)]
pub struct TaskPlan {
    /// Task id.
    pub id: String,
    /// Direct upstream task ids.
    pub after: Vec<String>,
    /// Trigger rule.
    pub rule: TriggerRule,
    /// Retries after the first try.
    pub retries: u32,
    /// Delay before a retry.
    pub retry_delay: Duration,
    /// Try timeout.
    pub timeout: Option<Duration>,
    /// Pool and slots taken.
    pub pool: Option<(String, u32)>,
    /// Most tries of this task running at once across runs.
    pub max_active: Option<u32>,
    /// A branch task: its output chooses which direct downstream tasks run.
    pub branch: bool,
    /// Returns follow-up tasks when it succeeds.
    pub follow_ups: bool,
}

/// One generated DAG.
#[derive(Debug, Clone)]
pub struct DagPlan {
    /// DAG id.
    pub id: String,
    /// The version every process gives this definition, so a run's version resolves everywhere.
    pub version: String,
    /// Most runs `running` at once.
    pub max_active_runs: u32,
    /// Most tasks queued or running at once in one run.
    pub max_active_tasks: Option<u32>,
    /// `@every` this many seconds from the simulation's start, and whether missed points are
    /// caught up; manual only when absent.
    pub schedule: Option<(u64, bool)>,
    /// Tasks in topological order.
    pub tasks: Vec<TaskPlan>,
}

impl DagPlan {
    /// The task `id`.
    pub fn task(&self, id: &str) -> Option<&TaskPlan> {
        self.tasks.iter().find(|t| t.id == id)
    }

    /// The DAG in one line, for the trace: its limits, then each task's id, upstreams, rule
    /// (when not all_success), pool and `max_active`, and whether it is a branch or returns
    /// follow-ups.
    pub fn describe(&self) -> String {
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .map(|t| {
                let mut line = format!("{}<-[{}]", t.id, t.after.join(","));
                if t.rule != TriggerRule::AllSuccess {
                    line.push_str(&format!(" {}", t.rule));
                }
                if let Some((pool, slots)) = &t.pool {
                    line.push_str(&format!(" pool={pool}:{slots}"));
                }
                if let Some(max) = t.max_active {
                    line.push_str(&format!(" max_active={max}"));
                }
                if t.branch {
                    line.push_str(" branch");
                }
                if t.follow_ups {
                    line.push_str(" follow-ups");
                }
                line
            })
            .collect();
        let tasks_limit = self.max_active_tasks.map(|max| format!(" max_active_tasks={max}")).unwrap_or_default();
        format!("max_active_runs={}{tasks_limit}: {}", self.max_active_runs, tasks.join("; "))
    }

    /// Direct downstream task ids of `id`.
    pub fn downstream(&self, id: &str) -> Vec<String> {
        self.tasks.iter().filter(|t| t.after.iter().any(|a| a == id)).map(|t| t.id.clone()).collect()
    }
}

/// The pools of every workload, with their slots.
pub fn pools() -> dagmq_core::Pools {
    [("db".to_string(), 2), ("api".to_string(), 1)].into_iter().collect()
}

/// Draws `count` DAGs.
pub fn plan_dags(rng: &Rng, count: usize) -> Vec<DagPlan> {
    (0..count).map(|i| plan_dag(rng, &format!("dag{i}"))).collect()
}

fn plan_dag(rng: &Rng, id: &str) -> DagPlan {
    let size = rng.between(2, 9) as usize;
    let mut tasks: Vec<TaskPlan> = Vec::new();
    for i in 0..size {
        let mut after = Vec::new();
        if i > 0 {
            // Mostly one or two upstreams from earlier tasks; now and then a root or a wide join.
            let wanted = match rng.below(10) {
                0 => 0,
                1..=5 => 1,
                6..=8 => 2,
                _ => 3,
            };
            for _ in 0..wanted {
                let up = format!("t{}", rng.below(i as u64));
                if !after.contains(&up) {
                    after.push(up);
                }
            }
        }
        let rule = if rng.chance(0.7) { TriggerRule::AllSuccess } else { *rng.pick(&TriggerRule::ALL) };
        let pool = match rng.below(8) {
            0 => Some(("db".to_string(), rng.between(1, 2) as u32)),
            1 => Some(("api".to_string(), 1)),
            _ => None,
        };
        tasks.push(TaskPlan {
            id: format!("t{i}"),
            after,
            rule,
            retries: if rng.chance(0.4) { rng.between(1, 2) as u32 } else { 0 },
            retry_delay: Duration::from_secs(rng.between(1, 10)),
            timeout: rng.chance(0.15).then(|| Duration::from_secs(rng.between(2, 8))),
            pool,
            max_active: rng.chance(0.1).then(|| rng.between(1, 2) as u32),
            branch: false,
            follow_ups: false,
        });
    }
    // Branch tasks need a downstream; follow-up producers are plain tasks.
    for i in 0..tasks.len() {
        let has_downstream = tasks.iter().any(|t| t.after.contains(&tasks[i].id));
        if has_downstream && rng.chance(0.2) {
            tasks[i].branch = true;
        } else if rng.chance(0.15) {
            tasks[i].follow_ups = true;
        }
    }
    DagPlan {
        id: id.to_string(),
        version: FIRST_VERSION.to_string(),
        max_active_runs: rng.between(1, 4) as u32,
        max_active_tasks: rng.chance(0.3).then(|| rng.between(1, 3) as u32),
        schedule: rng.chance(0.4).then(|| (rng.between(15, 90), rng.chance(0.5))),
        tasks,
    }
}

/// The next version of a DAG, as a reload would find its file changed: retries, retry delays
/// and timeouts drawn again, and now and then a task added at the end. Limits and pools stay
/// as they were (the checks count them per DAG, whatever the version).
pub fn mutate(rng: &Rng, plan: &DagPlan) -> DagPlan {
    let mut next = plan.clone();
    let n: u32 = plan.version.trim_start_matches("sim-").parse().unwrap_or(1);
    next.version = format!("sim-{}", n + 1);
    for task in &mut next.tasks {
        if rng.chance(0.5) {
            task.retries = if rng.chance(0.4) { rng.between(1, 2) as u32 } else { 0 };
            task.retry_delay = Duration::from_secs(rng.between(1, 10));
            task.timeout = rng.chance(0.2).then(|| Duration::from_secs(rng.between(2, 8)));
        }
    }
    if rng.chance(0.5) {
        let id = format!("t{}", next.tasks.len());
        let up = rng.pick(&next.tasks).id.clone();
        next.tasks.push(TaskPlan {
            id,
            after: vec![up],
            rule: TriggerRule::AllSuccess,
            retries: 0,
            retry_delay: Duration::from_secs(1),
            timeout: None,
            pool: None,
            max_active: None,
            branch: false,
            follow_ups: false,
        });
    }
    next
}

/// Builds the DAGs of `plans` for one process, their tasks running as `proc`.
pub fn build_dags(
    plans: &[DagPlan],
    seed: u64,
    world: &Arc<World>,
    history: &History,
    proc: &Arc<Proc>,
) -> DagRegistry {
    let mut registry = DagRegistry::new();
    for plan in plans {
        let mut builder = Dag::builder(&plan.id).version(&plan.version).max_active_runs(plan.max_active_runs);
        if let Some(max) = plan.max_active_tasks {
            builder = builder.max_active_tasks(max);
        }
        if let Some((every, catch_up)) = plan.schedule {
            builder = builder.schedule(format!("@every {every}s")).start(crate::origin()).catch_up(catch_up);
        }
        for task in &plan.tasks {
            let sim = SimTask {
                seed,
                world: world.clone(),
                history: history.clone(),
                proc: proc.clone(),
                downstream: plan.downstream(&task.id),
                branch: task.branch,
                follow_ups: task.follow_ups,
            };
            let mut spec = TaskSpec::rust(&task.id, sim)
                .after(task.after.clone())
                .trigger_rule(task.rule)
                .retries(task.retries)
                .retry_delay(task.retry_delay, 1.0, task.retry_delay);
            if let Some(timeout) = task.timeout {
                spec = spec.timeout(timeout);
            }
            if let Some((pool, slots)) = &task.pool {
                spec = spec.pool(pool, *slots);
            }
            if let Some(max) = task.max_active {
                spec = spec.max_active(max);
            }
            if task.branch {
                spec = spec.branch();
            }
            builder = builder.task(spec);
        }
        registry.add(builder.build().expect("generated DAG is valid")).expect("DAG ids are unique");
    }
    registry
}

/// The task registry of a worker: follow-ups run the simulated task by the name `sim`.
pub fn task_registry(seed: u64, world: &Arc<World>, history: &History, proc: &Arc<Proc>) -> dagmq_core::TaskRegistry {
    let mut registry = dagmq_worker::builtin_tasks();
    let (world, history, proc) = (world.clone(), history.clone(), proc.clone());
    registry.register("sim", move |_args| {
        Ok(Arc::new(SimTask {
            seed,
            world: world.clone(),
            history: history.clone(),
            proc: proc.clone(),
            downstream: Vec::new(),
            branch: false,
            follow_ups: false,
        }) as Arc<dyn Task>)
    });
    registry
}

/// A try counted among its worker's running ones while it lives (dropped as it ends, is
/// stopped, or its future is dropped).
struct RunningTry(Arc<Proc>);

impl RunningTry {
    fn enter(proc: &Arc<Proc>) -> RunningTry {
        proc.running.fetch_add(1, Ordering::SeqCst);
        RunningTry(proc.clone())
    }
}

impl Drop for RunningTry {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What happened to one try, as seen by the code that ran it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A try started on a worker.
    Start {
        /// The run.
        run: String,
        /// The task.
        task: String,
        /// The try.
        try_number: u32,
        /// The worker.
        worker: String,
        /// Simulated ms.
        at: u64,
    },
    /// A try ended by itself (it may still have been refused by the store).
    End {
        /// The run.
        run: String,
        /// The task.
        task: String,
        /// The try.
        try_number: u32,
        /// Whether it succeeded.
        ok: bool,
        /// A branch's choice.
        chose: Option<Vec<String>>,
        /// Simulated ms.
        at: u64,
    },
}

/// A command an operator sent, and when (the model needs to know which runs were reset).
#[derive(Debug, Clone)]
pub struct CommandRecord {
    /// What: trigger, cancel, suspend, resume, restart, clear, pause, unpause.
    pub kind: &'static str,
    /// The run (or DAG for pause) it named.
    pub target: String,
    /// Simulated ms when it was sent.
    #[allow(dead_code)]
    pub at: u64,
    /// Whether the scheduler answered ok (an unanswered command may still have applied).
    pub ok: Option<bool>,
}

/// Everything the checks read afterwards.
#[derive(Clone, Default)]
pub struct History {
    /// Try events in the order they happened.
    pub events: Arc<Mutex<Vec<Event>>>,
    /// Operator commands.
    pub commands: Arc<Mutex<Vec<CommandRecord>>>,
}

impl History {
    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    /// Records a command; answers its index, for [`History::answered`].
    pub fn command(&self, kind: &'static str, target: &str, at: u64) -> usize {
        let mut commands = self.commands.lock().unwrap();
        commands.push(CommandRecord { kind, target: target.to_string(), at, ok: None });
        commands.len() - 1
    }

    /// Records the answer to command `index`.
    pub fn answered(&self, index: usize, ok: bool) {
        self.commands.lock().unwrap()[index].ok = Some(ok);
    }
}

/// The task every generated task runs.
struct SimTask {
    seed: u64,
    world: Arc<World>,
    history: History,
    proc: Arc<Proc>,
    /// Direct downstream ids (a branch chooses among them).
    downstream: Vec<String>,
    branch: bool,
    follow_ups: bool,
}

#[async_trait]
impl Task for SimTask {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        self.proc.gate().await;
        let n = ctx.param("n").unwrap_or_else(|| ctx.run_id.clone());
        let seed = self.seed.to_string();
        let h = hash(&[&seed, &n, &ctx.task_id, &ctx.try_number.to_string()]);
        let work = if h.is_multiple_of(20) {
            Duration::from_secs(5 + (h >> 8) % 20)
        } else {
            Duration::from_millis(20 + (h >> 8) % 1500)
        };
        let verdict = (h >> 24) % 100;
        self.world
            .note(format_args!("{} starts {}/{} try {}", self.proc.name, ctx.run_id, ctx.task_id, ctx.try_number));
        // The worker runs at most as many tries at once as it has slots (a try claimed ahead
        // waits for its slot's try before).
        let _slot = RunningTry::enter(&self.proc);
        let (running, slots) = (self.proc.running.load(Ordering::SeqCst), self.proc.slots.load(Ordering::SeqCst));
        if slots > 0 && running > slots {
            self.world.violation(format!(
                "{} runs {running} tries at once with {slots} slots, {}/{} try {} starting at {} ms",
                self.proc.name,
                ctx.run_id,
                ctx.task_id,
                ctx.try_number,
                self.world.now_ms()
            ));
        }
        self.history.push(Event::Start {
            run: ctx.run_id.clone(),
            task: ctx.task_id.clone(),
            try_number: ctx.try_number,
            worker: self.proc.name.clone(),
            at: self.world.now_ms(),
        });
        tokio::select! {
            _ = tokio::time::sleep(work) => {}
            _ = ctx.cancel_signal().cancelled() => {
                self.world.note(format_args!("{} stopped {}/{} try {}", self.proc.name, ctx.run_id, ctx.task_id, ctx.try_number));
                return Err(TaskError::fatal("stopped"));
            }
        }
        // A frozen worker's try does not end while it is frozen; a crashed one's never does.
        self.proc.gate().await;
        let ok = verdict >= 12;
        let chose = self.branch.then(|| {
            self.downstream
                .iter()
                .enumerate()
                .filter(|(i, _)| (h >> (40 + i)) & 1 == 1)
                .map(|(_, d)| d.clone())
                .collect()
        });
        self.world.note(format_args!(
            "{} ends {}/{} try {}: {}{}",
            self.proc.name,
            ctx.run_id,
            ctx.task_id,
            ctx.try_number,
            if ok { "ok" } else { "failed" },
            chose.as_ref().map_or(String::new(), |c| format!(", chose {c:?}"))
        ));
        self.history.push(Event::End {
            run: ctx.run_id.clone(),
            task: ctx.task_id.clone(),
            try_number: ctx.try_number,
            ok,
            chose: chose.clone(),
            at: self.world.now_ms(),
        });
        if !ok {
            return Err(if verdict < 3 {
                TaskError::fatal("simulated fatal failure")
            } else {
                TaskError::new("simulated failure")
            });
        }
        if let Some(chose) = chose {
            return Ok(TaskOutcome::with_output(serde_json::json!(chose)));
        }
        if self.follow_ups {
            let mut follow_ups = vec![FollowUp::new("f1", "sim", serde_json::Value::Null)];
            if h & 0x100 != 0 {
                let mut second = FollowUp::new("f2", "sim", serde_json::Value::Null);
                second.after = vec!["f1".to_string()];
                follow_ups.push(second);
            }
            return Ok(TaskOutcome::with_follow_ups(follow_ups));
        }
        Ok(TaskOutcome::done())
    }
}
