//! Issue 22's protocol races, one targeted test each (races 1-7, 9 and 10; race 8, Redis
//! connections shared by liveness calls and large replies, needs real Redis). Each test asserts
//! what must hold, so it fails until its race is closed. The windows are opened with the fault
//! switches of `faults.rs` and with gates the test opens, over the in-memory backends on tokio's
//! paused clock: no test depends on timing luck.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::{
    Clock, Dag, DagRegistry, FollowUp, LiveDags, RunState, Store, Task, TaskContext, TaskError, TaskOutcome, TaskSpec,
    TaskState, TokioClock,
};
use dagmq_scheduler::CommandError;
use serde_json::{Value, json};

use crate::support::{Harness, Journal, ProcessFaults, origin};

/// Opens once; the tries of a gated [`Step`] wait for it.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How many tries of a set of tasks run now, and the most that ever ran at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicU32,
    max: AtomicU32,
}

/// Counts one try as running until dropped.
struct Running(Arc<Concurrency>);

impl Running {
    fn enter(counter: &Arc<Concurrency>) -> Running {
        let now = counter.now.fetch_add(1, Ordering::SeqCst) + 1;
        counter.max.fetch_max(now, Ordering::SeqCst);
        Running(counter.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// When a [`Step`] hangs until it is stopped.
#[derive(Clone, Copy, PartialEq)]
enum Hang {
    Never,
    FirstTry,
    Always,
}

/// The task of these tests: writes "start:ID" and then "end:ID" (or "stopped:ID" when its try is
/// stopped) in the journal; waits for its gate, if any, then works `work`; can hang; returns its
/// output and follow-ups.
struct Step {
    journal: Journal,
    clock: Arc<TokioClock>,
    work: Duration,
    gate: Option<Gate>,
    hang: Hang,
    output: Option<Value>,
    follow_ups: Vec<FollowUp>,
    running: Option<Arc<Concurrency>>,
    tries: AtomicU32,
    first_work: Option<Duration>,
}

impl Step {
    fn new(journal: &Journal, clock: &Arc<TokioClock>) -> Step {
        Step {
            journal: journal.clone(),
            clock: clock.clone(),
            work: Duration::from_millis(10),
            gate: None,
            hang: Hang::Never,
            output: None,
            follow_ups: Vec::new(),
            running: None,
            tries: AtomicU32::new(0),
            first_work: None,
        }
    }

    fn gated(mut self, gate: &Gate) -> Step {
        self.gate = Some(gate.clone());
        self
    }

    fn hanging(mut self, hang: Hang) -> Step {
        self.hang = hang;
        self
    }

    fn output(mut self, output: Value) -> Step {
        self.output = Some(output);
        self
    }

    fn follow_ups(mut self, follow_ups: Vec<FollowUp>) -> Step {
        self.follow_ups = follow_ups;
        self
    }

    /// The first try of the task (of whichever run) works `work` instead.
    fn slow_first(mut self, work: Duration) -> Step {
        self.first_work = Some(work);
        self
    }

    fn counted(mut self, counter: &Arc<Concurrency>, work: Duration) -> Step {
        self.running = Some(counter.clone());
        self.work = work;
        self
    }
}

#[async_trait]
impl Task for Step {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let n = self.tries.fetch_add(1, Ordering::SeqCst) + 1;
        self.journal.push(format!("start:{}", ctx.task_id), self.clock.now());
        let _running = self.running.as_ref().map(Running::enter);
        let hangs = match self.hang {
            Hang::Never => false,
            Hang::FirstTry => n == 1,
            Hang::Always => true,
        };
        let work = async {
            if hangs {
                std::future::pending::<()>().await;
            }
            if let Some(gate) = &self.gate {
                while !gate.is_open() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tokio::time::sleep(if n == 1 { self.first_work.unwrap_or(self.work) } else { self.work }).await;
        };
        tokio::select! {
            _ = work => {}
            _ = ctx.cancel_signal().cancelled() => {
                self.journal.push(format!("stopped:{}", ctx.task_id), self.clock.now());
                return Err(TaskError::fatal("stopped"));
            }
        }
        self.journal.push(format!("end:{}", ctx.task_id), self.clock.now());
        Ok(TaskOutcome { follow_ups: self.follow_ups.clone(), output: self.output.clone() })
    }
}

fn clock() -> Arc<TokioClock> {
    Arc::new(TokioClock::starting_at(origin()))
}

fn registry(dags: Vec<Dag>) -> DagRegistry {
    let mut registry = DagRegistry::new();
    for dag in dags {
        registry.add(dag).unwrap();
    }
    registry
}

/// A live DAG set holding `dags`, as a process that read its DAG directory has.
fn live(dags: &DagRegistry) -> Arc<LiveDags> {
    Arc::new(LiveDags::new(dags.clone(), Vec::new(), Default::default()))
}

/// Polls `check` every 10 ms until it answers true; panics with `what()` after `limit` of tokio
/// time.
async fn wait_until(limit: Duration, what: impl Fn() -> String, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Watches `check` for `limit` of tokio time: answers `false` as soon as it does not hold.
async fn holds_for(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if !check().await {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Waits, up to `limit`, for the run to reach a final state; answers it (or the state it is
/// stuck in).
async fn final_within(h: &Harness, run: &str, limit: Duration) -> RunState {
    let mut state = RunState::Queued;
    holds_for(limit, async || {
        state = h.store.run(run).await.unwrap().unwrap().state;
        !state.is_final()
    })
    .await;
    state
}

/// The run's tasks as (id, state, try), sorted, for messages.
async fn summary(h: &Harness, run: &str) -> Vec<(String, TaskState, u32)> {
    let mut tasks: Vec<(String, TaskState, u32)> =
        h.tasks(run).await.into_values().map(|t| (t.task_id, t.state, t.try_number)).collect();
    tasks.sort_by(|a, b| a.0.cmp(&b.0));
    tasks
}

/// Whether `down` started only after `up` ended, by the journal.
fn ended_before(journal: &Journal, up: &str, down: &str) -> bool {
    let entries = journal.entries();
    let ended = entries.iter().position(|e| *e == format!("end:{up}"));
    let started = entries.iter().position(|e| *e == format!("start:{down}"));
    matches!((ended, started), (Some(e), Some(s)) if e < s)
}

/// Race 1. `pick` (a branch) and `extract` are both upstream of `a` and `b`; `pick` chooses `a`.
///
/// Window: `pick`'s success is in the store, but the scheduler has not applied its choice yet
/// (here: the worker's status updates do not get through, so only the scheduler's 5 s sweep
/// would apply it). `extract` succeeds in that window. The worker's eager claim
/// (`record_outcome` -> `Store::finish_try`, `dagmq-worker/src/execute.rs`) offers `a` and `b`,
/// and the store claims each candidate whose upstreams all succeeded: `b` too, so the task
/// `pick` did not choose runs. `eager_candidates` leaves out the downstream tasks of a branch
/// only when the finishing task is the branch itself.
#[tokio::test(start_paused = true)]
async fn eager_claim_respects_a_branch_choice_of_another_upstream() {
    let journal = Journal::default();
    let clock = clock();
    let extract_done = Gate::default();
    let dag = Dag::builder("branch_join")
        .task(TaskSpec::rust("pick", Step::new(&journal, &clock).output(json!(["a"]))).branch())
        .task(TaskSpec::rust("extract", Step::new(&journal, &clock).gated(&extract_done)))
        .task(TaskSpec::rust("a", Step::new(&journal, &clock)).after(["pick", "extract"]))
        .task(TaskSpec::rust("b", Step::new(&journal, &clock)).after(["pick", "extract"]))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    h.worker_faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("branch_join").await;
    h.wait_task(&run, "pick", |t| t.state == TaskState::Success).await;
    h.wait_task(&run, "extract", |t| t.state == TaskState::Running).await;
    assert_eq!(h.tasks(&run).await["b"].state, TaskState::Pending, "precondition: the choice is not applied yet");

    extract_done.open();
    h.wait_task(&run, "extract", |t| t.state == TaskState::Success).await;
    h.worker_faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    let tasks = h.tasks(&run).await;
    let b_ran = journal.entries().contains(&"start:b".to_string());
    assert!(
        !b_ran && tasks["b"].state == TaskState::Skipped,
        "b, which pick did not choose, ran: claimed eagerly as extract succeeded before the scheduler applied \
         pick's choice (run {state}, tasks {:?}, journal {:?})",
        summary(&h, &run).await,
        journal.entries()
    );
    assert_eq!((state, tasks["a"].state), (RunState::Success, TaskState::Success));
    h.stop().await;
}

/// Race 1 on the scheduler's side (found by the simulator, seed 780 of 301..1000, without eager
/// dispatch): `pick` (a branch) chooses `a`, and the scheduler's skip of `b` fails before it
/// applies (the store does not answer). `extract`, the other upstream of both, succeeds next;
/// its status update decides `b` by its trigger rule alone (both upstreams succeeded) and
/// queues it, though `pick` did not choose it. A task's decision must take the choice of its
/// branch upstreams in, not only count their outcomes.
#[tokio::test(start_paused = true)]
async fn a_failed_branch_skip_does_not_let_another_upstream_queue_the_unchosen_task() {
    let journal = Journal::default();
    let clock = clock();
    let extract_done = Gate::default();
    let dag = Dag::builder("branch_join")
        .task(TaskSpec::rust("pick", Step::new(&journal, &clock).output(json!(["a"]))).branch())
        .task(TaskSpec::rust("extract", Step::new(&journal, &clock).gated(&extract_done)))
        .task(TaskSpec::rust("a", Step::new(&journal, &clock)).after(["pick", "extract"]))
        .task(TaskSpec::rust("b", Step::new(&journal, &clock)).after(["pick", "extract"]))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    h.scheduler_faults.store.batches_failing_for.lock().unwrap().push("b".to_string());
    let run = h.trigger("branch_join").await;
    h.wait_task(&run, "pick", |t| t.state == TaskState::Success).await;
    wait_until(
        Duration::from_secs(10),
        || "the scheduler never tried to skip b".to_string(),
        async || h.scheduler_faults.store.batches_failing_for.lock().unwrap().is_empty(),
    )
    .await;
    assert_eq!(h.tasks(&run).await["b"].state, TaskState::Pending, "precondition: the skip of b failed");

    extract_done.open();
    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    let tasks = h.tasks(&run).await;
    let b_ran = journal.entries().contains(&"start:b".to_string());
    assert!(
        !b_ran && tasks["b"].state == TaskState::Skipped,
        "b, which pick did not choose, ran: queued as extract succeeded after the skip of b failed (run {state}, \
         tasks {:?}, journal {:?})",
        summary(&h, &run).await,
        journal.entries()
    );
    assert_eq!((state, tasks["a"].state), (RunState::Success, TaskState::Success));
    h.stop().await;
}

/// Race 2. `D` waits for `P` and `A`; `P` returns a follow-up `x`, which the scheduler adds to
/// the run as `P.x` and to `D`'s upstreams.
///
/// Window: `P`'s success (with its follow-ups) is in the store, and the scheduler has not added
/// the follow-ups yet (its status updates do not get through here). `A` succeeds in that window
/// and its worker claims `D` eagerly: `Store::finish_try` checks `D`'s upstreams as stored
/// (`P` and `A`, both successes) and knows nothing of follow-ups still to come, so `D` runs
/// before `P.x` exists. The store step (memory `finish_try`, the Redis `finish_try` script)
/// must refuse a candidate with an upstream whose follow-ups are not added yet.
#[tokio::test(start_paused = true)]
async fn eager_claim_waits_for_the_follow_ups_of_another_upstream() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let mut tasks = dagmq_worker::builtin_tasks();
    let (j, c) = (journal.clone(), clock.clone());
    tasks.register("step", move |_| Ok(Arc::new(Step::new(&j, &c)) as Arc<dyn Task>));
    let dag = Dag::builder("expanding")
        .task(TaskSpec::rust(
            "P",
            Step::new(&journal, &clock).follow_ups(vec![FollowUp::new("x", "step", Value::Null)]),
        ))
        .task(TaskSpec::rust("A", Step::new(&journal, &clock).gated(&a_done)))
        .task(TaskSpec::rust("D", Step::new(&journal, &clock)).after(["P", "A"]))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), tasks).await;
    h.worker_faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("expanding").await;
    h.wait_task(&run, "P", |t| t.state == TaskState::Success).await;
    h.wait_task(&run, "A", |t| t.state == TaskState::Running).await;
    assert!(!h.tasks(&run).await.contains_key("P.x"), "precondition: the follow-up is not added yet");

    a_done.open();
    h.wait_task(&run, "A", |t| t.state == TaskState::Success).await;
    h.worker_faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert!(
        ended_before(&journal, "P.x", "D"),
        "D started before P's follow-up P.x ended: claimed eagerly as A succeeded, before the scheduler added \
         P.x to D's upstreams (run {state}, tasks {:?}, journal {:?})",
        summary(&h, &run).await,
        journal.entries()
    );
    assert_eq!(state, RunState::Success);
    h.stop().await;
}

/// Race 2 on the scheduler's side (found by the simulator, seed 748 of 301..1000): `P`
/// succeeds with follow-up `x`, and the scheduler's `add_tasks` fails before it applies. `A`,
/// the other upstream of `D`, succeeds next; its status update decides `D` by the counts of
/// `D`'s upstreams as stored (`P` and `A`, both successes) and queues it before `P.x` exists.
/// A task must wait while an upstream's follow-ups are not in the run.
#[tokio::test(start_paused = true)]
async fn a_failed_follow_up_insertion_does_not_let_another_upstream_queue_the_join() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let mut tasks = dagmq_worker::builtin_tasks();
    let (j, c) = (journal.clone(), clock.clone());
    tasks.register("step", move |_| Ok(Arc::new(Step::new(&j, &c)) as Arc<dyn Task>));
    let dag = Dag::builder("expanding")
        .task(TaskSpec::rust(
            "P",
            Step::new(&journal, &clock).follow_ups(vec![FollowUp::new("x", "step", Value::Null)]),
        ))
        .task(TaskSpec::rust("A", Step::new(&journal, &clock).gated(&a_done)))
        .task(TaskSpec::rust("D", Step::new(&journal, &clock)).after(["P", "A"]))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), tasks).await;
    h.scheduler_faults.store.add_tasks_failing.store(1, Ordering::SeqCst);
    let run = h.trigger("expanding").await;
    h.wait_task(&run, "P", |t| t.state == TaskState::Success).await;
    wait_until(
        Duration::from_secs(10),
        || "the scheduler never tried to add P's follow-ups".to_string(),
        async || h.scheduler_faults.store.add_tasks_failing.load(Ordering::SeqCst) == 0,
    )
    .await;
    assert!(!h.tasks(&run).await.contains_key("P.x"), "precondition: the follow-up is not added yet");

    a_done.open();
    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert!(
        ended_before(&journal, "P.x", "D"),
        "D started before P's follow-up P.x ended: queued as A succeeded after the insertion of P.x failed (run \
         {state}, tasks {:?}, journal {:?})",
        summary(&h, &run).await,
        journal.entries()
    );
    assert_eq!(state, RunState::Success);
    h.stop().await;
}

/// `a` (hangs on its first try, so it is running when the run is suspended) then `b`; or, with
/// a gate, `a` waits for the gate.
fn two_steps(id: &str, journal: &Journal, clock: &Arc<TokioClock>, gate: Option<&Gate>) -> DagRegistry {
    let a = match gate {
        Some(gate) => Step::new(journal, clock).gated(gate),
        None => Step::new(journal, clock).hanging(Hang::FirstTry),
    };
    registry(vec![
        Dag::builder(id)
            .task(TaskSpec::rust("a", a))
            .task(TaskSpec::rust("b", Step::new(journal, clock)).after(["a"]))
            .build()
            .unwrap(),
    ])
}

/// Race 3, resume. Window: the store applies the resume (`suspended` -> `running`) and its
/// answer is lost. `Engine::resume` (`dagmq-scheduler/src/engine.rs`) returns the error from
/// `move_run` before it sets the view's record to `running`, so the scheduler's view keeps the
/// run `suspended` for good: `queue_tasks` queues nothing in a suspended run, the sweep rebuilds
/// the tasks but keeps the record, and a second resume is refused because the store says
/// `running`. The run never goes on.
#[tokio::test(start_paused = true)]
async fn a_resume_whose_answer_was_lost_still_resumes_the_run() {
    let journal = Journal::default();
    let clock = clock();
    let h = Harness::start(two_steps("resumable", &journal, &clock, None)).await;
    let run = h.trigger("resumable").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.scheduler.suspend(&run).await.unwrap();
    h.wait_task(&run, "a", |t| t.state == TaskState::Suspended).await;

    *h.scheduler_faults.store.lose_run_answer_to.lock().unwrap() = Some(RunState::Running);
    let lost = h.scheduler.resume(&run).await;
    let fault = h.scheduler_faults.store.lose_run_answer_to.lock().unwrap().take();
    assert_eq!(fault, None, "precondition: the resume's answer was lost (the command answered {lost:?})");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Running, "precondition: it applied");
    // The operator tries again, as the error invites.
    let again = h.scheduler.resume(&run).await;

    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert_eq!(
        state,
        RunState::Success,
        "the run, resumed in the store, never went on: the scheduler's view kept it suspended (the resume \
         answered {lost:?}, its retry {again:?}; tasks {:?})",
        summary(&h, &run).await
    );
    h.stop().await;
}

/// Race 3, suspend. Window: the store applies the suspension (`running` -> `suspended`) and its
/// answer is lost. `Engine::suspend` returns the error from `move_run` before it sets the view's
/// record and before `suspend_tasks`, so the scheduler's view keeps the run `running`: the try of
/// `a` is not stopped, and when it succeeds the scheduler queues `b` (its `queue_tasks` checks
/// the view's record only) in a run the store has suspended; a second suspend is refused
/// because the store says `suspended`.
#[tokio::test(start_paused = true)]
async fn a_suspension_whose_answer_was_lost_queues_nothing_more_in_the_run() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let h = Harness::start(two_steps("suspendable", &journal, &clock, Some(&a_done))).await;
    let run = h.trigger("suspendable").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;

    *h.scheduler_faults.store.lose_run_answer_to.lock().unwrap() = Some(RunState::Suspended);
    let lost = h.scheduler.suspend(&run).await;
    let fault = h.scheduler_faults.store.lose_run_answer_to.lock().unwrap().take();
    assert_eq!(fault, None, "precondition: the suspension's answer was lost (the command answered {lost:?})");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended, "precondition: it applied");
    let again = h.scheduler.suspend(&run).await;

    // The try of `a` ends (stopped by the suspension, or finished if it never was stopped).
    a_done.open();
    h.wait_task(&run, "a", |t| matches!(t.state, TaskState::Success | TaskState::Suspended)).await;
    let mut b = None;
    let untouched = holds_for(Duration::from_secs(30), async || {
        let task = h.store.task(&run, "b").await.unwrap().unwrap();
        let pending = task.state == TaskState::Pending;
        b = Some(task);
        pending
    })
    .await;
    let b = b.unwrap();
    assert!(
        untouched,
        "b became {} (try {}) in a run the store has suspended: after the suspension's lost answer the \
         scheduler's view kept the run running (the suspend answered {lost:?}, its retry {again:?}; journal {:?})",
        b.state,
        b.try_number,
        journal.entries()
    );
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(final_within(&h, &run, Duration::from_secs(120)).await, RunState::Success);
    h.stop().await;
}

/// Race 3, suspend, when the run cannot be read again either: the suspension applied, its
/// answer was lost, and the scheduler's read of the run fails too, so it does not know which
/// way the write went. Its view must be safe both ways (nothing new is queued; here the sweep
/// cannot read the run either, and `a` ends meanwhile), and the operator's retry must finish
/// the suspension rather than answer that the run is suspended already.
#[tokio::test(start_paused = true)]
async fn a_suspension_in_doubt_queues_nothing_and_its_retry_finishes_it() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let h = Harness::start(two_steps("doubtful", &journal, &clock, Some(&a_done))).await;
    let faults = &h.scheduler_faults.store;
    let run = h.trigger("doubtful").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;

    faults.lost_run_answer_hides_run.store(true, Ordering::SeqCst);
    *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Suspended);
    let lost = h.scheduler.suspend(&run).await;
    assert!(faults.run_reads_failing.load(Ordering::SeqCst), "precondition: the answer was lost ({lost:?})");
    assert!(lost.is_err(), "the scheduler cannot know that the suspension applied: {lost:?}");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended, "precondition: it applied");

    a_done.open();
    h.wait_task(&run, "a", |t| t.state == TaskState::Success).await;
    let untouched = holds_for(Duration::from_secs(30), async || {
        h.store.task(&run, "b").await.unwrap().unwrap().state == TaskState::Pending
    })
    .await;
    assert!(
        untouched,
        "b was queued in a suspended run while the scheduler could not read it: {:?}",
        journal.entries()
    );

    faults.run_reads_failing.store(false, Ordering::SeqCst);
    let again = h.scheduler.suspend(&run).await;
    assert!(again.is_ok(), "the retry finishes the suspension whose answer was lost: {again:?}");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended);
    let conflict = h.scheduler.suspend(&run).await.unwrap_err();
    assert!(matches!(conflict, CommandError::Conflict(_)), "once finished, a suspend is a conflict again: {conflict}");
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(final_within(&h, &run, Duration::from_secs(120)).await, RunState::Success);
    h.stop().await;
}

/// Race 3, suspend in doubt, without a retry: the sweep reads the run again once it can, and
/// finishes the suspension (the try of `a` is stopped).
#[tokio::test(start_paused = true)]
async fn a_suspension_in_doubt_is_finished_by_the_sweep() {
    let journal = Journal::default();
    let clock = clock();
    let h = Harness::start(two_steps("doubtful", &journal, &clock, None)).await;
    let faults = &h.scheduler_faults.store;
    let run = h.trigger("doubtful").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;

    faults.lost_run_answer_hides_run.store(true, Ordering::SeqCst);
    *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Suspended);
    let lost = h.scheduler.suspend(&run).await;
    assert!(faults.run_reads_failing.load(Ordering::SeqCst), "precondition: the answer was lost ({lost:?})");
    faults.run_reads_failing.store(false, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        || format!("the sweep did not finish the suspension whose answer was lost: {:?}", journal.entries()),
        async || h.store.task(&run, "a").await.unwrap().unwrap().state == TaskState::Suspended,
    )
    .await;
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(final_within(&h, &run, Duration::from_secs(120)).await, RunState::Success);
    h.stop().await;
}

/// Race 3, suspend in doubt, and the worker running `a` is lost meanwhile (its store calls
/// fail, so its heartbeat ages past the worker timeout). The scheduler's view holds the run
/// suspended, so the lost worker's try must not come back as a new queued try (the zombie
/// check's requeue is a queueing too): it is stopped as the suspension would stop it.
#[tokio::test(start_paused = true)]
async fn a_try_interrupted_in_a_run_suspended_in_doubt_is_not_queued_again() {
    let journal = Journal::default();
    let clock = clock();
    let h = Harness::start(two_steps("doubtful", &journal, &clock, None)).await;
    let faults = &h.scheduler_faults.store;
    let run = h.trigger("doubtful").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;

    faults.lost_run_answer_hides_run.store(true, Ordering::SeqCst);
    *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Suspended);
    let lost = h.scheduler.suspend(&run).await;
    assert!(faults.run_reads_failing.load(Ordering::SeqCst), "precondition: the answer was lost ({lost:?})");
    h.worker_faults.store.down.store(true, Ordering::SeqCst);
    let a = h.wait_task(&run, "a", |t| t.state != TaskState::Running).await;
    assert_eq!(
        (a.state, a.try_number),
        (TaskState::Suspended, 1),
        "the lost worker's try in a suspended run was handled as in a running one: {a:?}"
    );

    h.worker_faults.store.down.store(false, Ordering::SeqCst);
    faults.run_reads_failing.store(false, Ordering::SeqCst);
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(final_within(&h, &run, Duration::from_secs(120)).await, RunState::Success);
    h.stop().await;
}

/// Race 3, resume, when the run cannot be read again either. The view stays suspended (safe:
/// nothing is queued), and the operator's retry finishes the resume rather than answer that
/// the run is running already; without a retry, the sweep does.
#[tokio::test(start_paused = true)]
async fn a_resume_in_doubt_is_finished_by_its_retry_or_by_the_sweep() {
    for retried in [true, false] {
        let journal = Journal::default();
        let clock = clock();
        let h = Harness::start(two_steps("doubtful", &journal, &clock, None)).await;
        let faults = &h.scheduler_faults.store;
        let run = h.trigger("doubtful").await;
        h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
        h.scheduler.suspend(&run).await.unwrap();
        h.wait_task(&run, "a", |t| t.state == TaskState::Suspended).await;

        faults.lost_run_answer_hides_run.store(true, Ordering::SeqCst);
        *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Running);
        let lost = h.scheduler.resume(&run).await;
        assert!(faults.run_reads_failing.load(Ordering::SeqCst), "precondition: the answer was lost ({lost:?})");
        assert!(lost.is_err(), "the scheduler cannot know that the resume applied: {lost:?}");
        assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Running, "precondition: it applied");
        let waiting = holds_for(Duration::from_secs(20), async || {
            h.store.task(&run, "a").await.unwrap().unwrap().state == TaskState::Suspended
        })
        .await;
        assert!(waiting, "a was queued while the scheduler did not know whether the run was resumed");

        faults.run_reads_failing.store(false, Ordering::SeqCst);
        if retried {
            let again = h.scheduler.resume(&run).await;
            assert!(again.is_ok(), "the retry finishes the resume whose answer was lost: {again:?}");
            let a = h.store.task(&run, "a").await.unwrap().unwrap();
            assert!(
                matches!(a.state, TaskState::Queued | TaskState::Running) && a.try_number == 2,
                "the retried resume queued a's next try at once: {a:?}"
            );
        }
        let state = final_within(&h, &run, Duration::from_secs(120)).await;
        assert_eq!(state, RunState::Success, "retried: {retried}; tasks {:?}", summary(&h, &run).await);
        h.stop().await;
    }
}

/// Race 4. An outcome the scheduler found while queueing a task that had moved on is kept in
/// `ActiveRun::deferred` as (index in `tasks`, instance) until `put_back` acts on it. When
/// `put_back` fails partway, the rest stay deferred, and the next sweep replaces `tasks` with
/// the store's listing and rebuilds the view: an index then names whatever task the listing put
/// there. The store gives the listing no order (Redis answers `HGETALL` in hash order); here it
/// answers in reverse, as the fault switch makes it.
///
/// Window: u -> (b1, b2) -> (c1, c2) -> z; b1 and b2 are claimed eagerly as u succeeds, c1 and
/// c2 (under `max_active`) are the scheduler's to queue. The scheduler hears nothing from the
/// worker and its sweep cannot read the run, so at 20 s its check of stale queued tasks finds u
/// succeeded, tries to queue b1 and b2 (refused: they ran), defers both outcomes, acts on b1 and
/// fails to queue c1: b2's outcome stays deferred at index 2. The 25 s sweep reads the tasks
/// reversed, where index 2 is c1, queues c1 and c2, and then applies b2's success to c1's place.
/// The view takes c1 for done: z is queued as soon as c2 succeeds, while c1 still runs, and the
/// run is finished as a success with c1 still running.
/// The fix belongs in `active_run.rs` (`deferred` keyed by task id, or cleared by `rebuild`) and
/// `Engine::put_back`.
#[tokio::test(start_paused = true)]
async fn a_deferred_outcome_is_applied_to_its_own_task_after_a_rebuild_in_another_order() {
    let journal = Journal::default();
    let clock = clock();
    let c1_done = Gate::default();
    let step = || Step::new(&journal, &clock);
    let dag = Dag::builder("shuffled")
        .task(TaskSpec::rust("u", step()))
        .task(TaskSpec::rust("b1", step()).after(["u"]))
        .task(TaskSpec::rust("b2", step()).after(["u"]))
        .task(TaskSpec::rust("c1", step().gated(&c1_done)).after(["b1"]).max_active(10))
        .task(TaskSpec::rust("c2", step()).after(["b2"]).max_active(10))
        .task(TaskSpec::rust("z", step()).after(["c1", "c2"]))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    let faults = &h.scheduler_faults.store;
    h.worker_faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    faults.task_lists_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("shuffled").await;
    let order: Vec<String> = h.store.tasks(&run).await.unwrap().into_iter().map(|t| t.task_id).collect();
    assert_eq!(order, ["u", "b1", "b2", "c1", "c2", "z"], "precondition: the view's order");
    h.wait_task(&run, "b1", |t| t.state == TaskState::Success).await;
    h.wait_task(&run, "b2", |t| t.state == TaskState::Success).await;
    faults.batches_failing_for.lock().unwrap().push("c1".to_string());
    wait_until(
        Duration::from_secs(60),
        || "precondition: the scheduler never tried to queue c1".to_string(),
        async || faults.batches_failing_for.lock().unwrap().is_empty(),
    )
    .await;
    assert_eq!(h.tasks(&run).await["c1"].state, TaskState::Pending, "precondition: queueing c1 failed");

    faults.task_lists_failing.store(false, Ordering::SeqCst);
    faults.task_lists_reversed.store(true, Ordering::SeqCst);
    h.wait_task(&run, "c1", |t| t.state != TaskState::Pending).await;
    h.wait_task(&run, "c2", |t| t.state != TaskState::Pending).await;
    h.worker_faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    h.wait_task(&run, "c2", |t| t.state == TaskState::Success).await;
    // z waits for c1, held at its gate; watch a while before letting c1 finish.
    holds_for(Duration::from_secs(30), async || h.tasks(&run).await["z"].state == TaskState::Pending).await;
    c1_done.open();
    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert!(
        ended_before(&journal, "c1", "z"),
        "z started before its upstream c1 ended: b2's deferred success was applied to c1 after the sweep \
         rebuilt the view in another order (run {state}, tasks {:?}, journal {:?})",
        summary(&h, &run).await,
        journal.entries()
    );
    assert_eq!(state, RunState::Success);
    h.stop().await;
}

/// Race 5. The lease holder is the fence (`scheduler-<id>-<term>`), and renewal is the same
/// store call as taking the lease: a free lease is taken by whoever asks. So a scheduler that
/// lost the lease while frozen, and finds it free when it thaws (the other released it),
/// renews it under its old term, and its fenced writes pass again, from a view that missed
/// everything the other did.
///
/// Window: A (active) freezes: its loop stalls mid-call and its lease renewal is held. B takes
/// the lease, pauses the DAG and stops (releasing the lease). A thaws: its held renewal takes the
/// free lease under A's old term, so A never steps down; at the next schedule point its watcher,
/// with the record it cached before the pause, creates a run and writes the record back
/// unpaused. Over Redis the freeze is a SIGSTOP past the lease's TTL. Here the renewal task
/// keeps tokio time, so B is given a clock 30 s ahead, for which the in-memory lease (timed by
/// its callers' clocks) has expired, and A's renewal is held within its timeout. The fix
/// belongs in the lease (`Store::acquire_lease` or a renewal call of its own that only extends
/// a lease its caller holds) and in `renew_lease` (`dagmq-scheduler/src/engine.rs`), which must
/// step down when the renewal finds the lease not held.
#[tokio::test(start_paused = true)]
async fn a_scheduler_frozen_past_its_lease_does_not_renew_it_under_its_old_term() {
    let journal = Journal::default();
    let clock = clock();
    let dag = Dag::builder("ticking")
        .schedule("@every 10m")
        .catch_up(false)
        .task(TaskSpec::rust("t", Step::new(&journal, &clock)))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    let all_runs = async || {
        let filter = dagmq_core::store::RunFilter { dag_id: Some("ticking".into()), limit: 100, ..Default::default() };
        h.store.list_runs(&filter).await.unwrap()
    };
    wait_until(
        Duration::from_secs(60),
        || "precondition: the first scheduled run did not succeed".to_string(),
        async || {
            let runs = all_runs().await;
            runs.len() == 1 && runs[0].state == RunState::Success
        },
    )
    .await;

    // A freezes.
    let a = &h.scheduler_faults.store;
    a.calls_stalled.store(true, Ordering::SeqCst);
    a.lease_held.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        || "precondition: A's lease renewal never came".to_string(),
        async || a.lease_waits.load(Ordering::SeqCst) > 0,
    )
    .await;
    // B takes over, pauses the DAG and stops.
    let b_faults = ProcessFaults::default();
    let b_clock = Arc::new(TokioClock::starting_at(h.clock.now() + chrono::Duration::seconds(30)));
    let (b_stop, b, b_task) = h.extra_scheduler_with_clock(&b_faults, &b_clock);
    b.set_paused("ticking", true).await.unwrap();
    assert!(b_faults.store.leases_taken.load(Ordering::SeqCst) > 0, "precondition: B held the lease");
    b_stop.cancel();
    b_task.await.unwrap().unwrap();
    // A thaws: its held renewal first, then its loop.
    let answered = a.leases_taken.load(Ordering::SeqCst);
    let waits = a.lease_waits.load(Ordering::SeqCst);
    a.lease_held.store(false, Ordering::SeqCst);
    let kept_out = holds_for(Duration::from_secs(1), async || a.leases_taken.load(Ordering::SeqCst) == answered).await;
    a.calls_stalled.store(false, Ordering::SeqCst);

    // Two schedule points later the DAG is still paused and has no new run.
    let mut runs = Vec::new();
    let mut paused = true;
    holds_for(Duration::from_secs(25 * 60), async || {
        runs = all_runs().await;
        paused = h.store.dag_record("ticking").await.unwrap().is_some_and(|r| r.paused);
        runs.len() == 1 && paused
    })
    .await;
    assert!(
        paused && runs.len() == 1,
        "the pause made through B was undone (paused: {paused}; runs: {:?}): A renewed the free lease under its \
         old term (took it again at once: {}, held renewals: {waits}) and its watcher wrote from the view it had \
         before",
        runs.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        !kept_out
    );
    h.stop().await;
}

/// Race 6. Window: the DAG file changes (a `timeout` is added) after the worker started; the
/// worker loads the new version (the live set) and runs the new run's try with it, but
/// `run_try` (`dagmq-worker/src/execute.rs`) takes the timeout from `config.dags`, the DAG files
/// loaded at start, not from the run's version. The hung try is never stopped. The fix: take
/// the timeout from the definition `resolve` found for the run's version.
#[tokio::test(start_paused = true)]
async fn a_timeout_added_by_a_live_reload_stops_a_hung_try() {
    let journal = Journal::default();
    let clock = clock();
    let dag_at = |version: &str, timeout: Option<Duration>| {
        let mut task = TaskSpec::rust("t", Step::new(&journal, &clock).hanging(Hang::Always));
        if let Some(timeout) = timeout {
            task = task.timeout(timeout);
        }
        registry(vec![Dag::builder("hangs").version(version).task(task).build().unwrap()])
    };
    let v1 = dag_at("v1", None);
    let live = live(&v1);
    let h = Harness::start_live(v1, live.clone()).await;
    live.replace(dag_at("v2", Some(Duration::from_secs(5))), Vec::new(), Default::default());
    h.scheduler.dags_changed().await;
    let run = h.trigger("hangs").await;
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().dag_version.as_deref(), Some("v2"), "precondition");
    h.wait_task(&run, "t", |t| t.state == TaskState::Running).await;

    // The timeout (5 s) and the stop's grace (10 s) are long over by then.
    let mut t = None;
    holds_for(Duration::from_secs(60), async || {
        let task = h.store.task(&run, "t").await.unwrap().unwrap();
        let running = task.state == TaskState::Running;
        t = Some(task);
        running
    })
    .await;
    let t = t.unwrap();
    assert!(
        t.state == TaskState::Failed && t.error.as_deref() == Some("timed out after 5s"),
        "the try of t (version v2, timeout 5s) is {} after 60s (error {:?}): the worker took the timeout from the \
         DAG files it loaded at start (v1, none)",
        t.state,
        t.error
    );
    h.stop().await;
}

/// Race 7. Window: the scheduler has loaded a changed DAG file (version v2) and the worker has
/// not yet (each process reads its DAG directory on its own, every 2 s). A run triggered then is
/// of v2; the worker claims its try, `resolve` -> `dag_version` (`dagmq-worker/src/execute.rs`)
/// answers "worker has not loaded version v2 of dag ...", and `fail_claimed` fails the try for
/// good (no retry), so the run fails although the worker loads v2 right after. The worker must
/// load the version (read its DAG directory again, or wait and try again) without failing the
/// try or using up its retries.
#[tokio::test(start_paused = true)]
async fn a_run_triggered_right_after_a_dag_file_changed_waits_for_its_worker_to_load_it() {
    let journal = Journal::default();
    let clock = clock();
    let dag_at = |version: &str, tasks: &[&str]| {
        let mut dag = Dag::builder("changing").version(version);
        for id in tasks {
            dag = dag.task(TaskSpec::rust(*id, Step::new(&journal, &clock)).retries(1));
        }
        registry(vec![dag.build().unwrap()])
    };
    let v1 = dag_at("v1", &["t"]);
    let scheduler_dags = live(&v1);
    let mut h = Harness::start_live(v1.clone(), scheduler_dags.clone()).await;
    // The worker reads its DAG directory on its own.
    let worker_dags = live(&v1);
    h.stop_worker().await;
    h.live = Some(worker_dags.clone());
    h.start_worker();

    let v2 = dag_at("v2", &["t", "t2"]);
    scheduler_dags.replace(v2.clone(), Vec::new(), Default::default());
    h.scheduler.dags_changed().await;
    let reads = h.worker_faults.store.run_reads.load(Ordering::SeqCst);
    let run = h.trigger("changing").await;
    // The worker takes the task up (it reads the run's record, to learn its version) before its
    // own reload comes.
    wait_until(
        Duration::from_secs(60),
        || "precondition: the worker never took the task up".to_string(),
        async || h.worker_faults.store.run_reads.load(Ordering::SeqCst) > reads,
    )
    .await;
    worker_dags.replace(v2, Vec::new(), Default::default());

    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    let t = &h.tasks(&run).await["t"];
    assert!(
        state == RunState::Success && t.error.is_none() && t.tries_left() == 1,
        "run {state}; t {} at try {} with {} tries left, error {:?}: the worker failed the try for a DAG version \
         it had not loaded yet",
        t.state,
        t.try_number,
        t.tries_left(),
        t.error
    );
    h.stop().await;
}

/// Race 9. Window: a run is in flight when its DAG file is removed, and the scheduler restarts
/// before the run ends. The new scheduler loads the files on disk, which no longer define the
/// DAG; `Engine::recover` (`dag_of` answers `None`) leaves the run "as it is", and status
/// updates for it are ignored as for an inactive run. Without the restart, the run completes
/// with the version it was created with (the live set keeps every version). The scheduler must
/// complete it after a restart too (the version's definition kept in the store, or its recorded
/// graph).
#[tokio::test(start_paused = true)]
async fn runs_of_a_dag_whose_file_was_removed_before_a_scheduler_restart_complete() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let dags = registry(vec![
        Dag::builder("doomed")
            .version("v1")
            .task(TaskSpec::rust("a", Step::new(&journal, &clock).gated(&a_done)))
            .task(TaskSpec::rust("b", Step::new(&journal, &clock)).after(["a"]))
            .build()
            .unwrap(),
    ]);
    let mut h = Harness::start_live(dags.clone(), live(&dags)).await;
    let run = h.trigger("doomed").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    // The file is removed; the scheduler restarts and loads what is on disk.
    h.dags = DagRegistry::new();
    h.live = Some(live(&h.dags));
    h.restart_scheduler().await;
    a_done.open();

    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert_eq!(
        state,
        RunState::Success,
        "the run of the removed DAG never finished after the scheduler restarted (tasks {:?})",
        summary(&h, &run).await
    );
    h.stop().await;
}

/// Race 10. Window: a run of version v1 (`max_active_tasks = 1`) is in flight when the file
/// changes to v2 (no limit) and the scheduler restarts. The new scheduler has loaded only v2, and
/// `Engine::dag_of` falls back to the current file for a version it has not loaded: the run is
/// scheduled with v2's settings, so its three downstream tasks are queued at once, while its
/// version allows one at a time. (Workers claim under the run's own version, v1, which has a
/// limit and so no eager claims.) One version per run, everywhere: the scheduler must schedule
/// the run with v1's settings after a restart too.
#[tokio::test(start_paused = true)]
async fn runs_of_an_older_dag_version_keep_its_limits_after_a_scheduler_restart() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let running = Arc::new(Concurrency::default());
    let dag_at = |version: &str, limit: Option<u32>| {
        let mut dag = Dag::builder("fan").version(version);
        if let Some(limit) = limit {
            dag = dag.max_active_tasks(limit);
        }
        dag = dag.task(TaskSpec::rust("a", Step::new(&journal, &clock).gated(&a_done)));
        for id in ["b1", "b2", "b3"] {
            let step = Step::new(&journal, &clock).counted(&running, Duration::from_secs(1));
            dag = dag.task(TaskSpec::rust(id, step).after(["a"]));
        }
        registry(vec![dag.build().unwrap()])
    };
    let v1 = dag_at("v1", Some(1));
    let dags = live(&v1);
    let mut h = Harness::start_live(v1, dags.clone()).await;
    let run = h.trigger("fan").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    // The file changes (the worker reloads it too, keeping v1) and the scheduler restarts.
    let v2 = dag_at("v2", None);
    dags.replace(v2.clone(), Vec::new(), Default::default());
    h.live = Some(live(&v2));
    h.dags = v2;
    h.restart_scheduler().await;
    a_done.open();

    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert_eq!(state, RunState::Success, "tasks {:?}", summary(&h, &run).await);
    let most = running.max.load(Ordering::SeqCst);
    assert!(
        most <= 1,
        "{most} tasks of the run (version v1, max_active_tasks = 1) ran at once after the scheduler restarted: it \
         was scheduled with the current file's settings (v2, no limit); journal {:?}",
        journal.entries()
    );
    h.stop().await;
}

/// Recovery loads one view at a time. Window: pool `one` has one slot; run A (older) has a task
/// waiting for it, which a task of run B (newer) holds, when the scheduler restarts.
/// `Engine::recover` activated the unfinished runs oldest first and settled each at once: A's
/// waiting task was queued before B's view (and its running task's claim on the pool) was
/// loaded, so both ran at once. Every view must be loaded before anything is queued.
#[tokio::test(start_paused = true)]
async fn a_scheduler_restart_loads_every_run_before_it_queues_a_task() {
    let journal = Journal::default();
    let clock = clock();
    let running = Arc::new(Concurrency::default());
    // `w`'s first try (the older run's) is slow, so the newer run reaches the pool first.
    let w = Step::new(&journal, &clock).slow_first(Duration::from_secs(20));
    let q = Step::new(&journal, &clock).counted(&running, Duration::from_secs(60));
    let dags = registry(vec![
        Dag::builder("pooled")
            .task(TaskSpec::rust("w", w))
            .task(TaskSpec::rust("q", q).after(["w"]).pool("one", 1))
            .build()
            .unwrap(),
    ]);
    let pools: dagmq_core::Pools = [("one".to_string(), 1)].into();
    let mut h = Harness::start_with_pools(dags, dagmq_worker::builtin_tasks(), pools).await;
    let older = h.trigger("pooled").await;
    h.wait_task(&older, "w", |t| t.state == TaskState::Running).await;
    let newer = h.trigger("pooled").await;
    h.wait_task(&newer, "q", |t| t.state == TaskState::Running).await;
    h.wait_task(&older, "w", |t| t.state == TaskState::Success).await;
    // The older run's `q` is ready and waits for the pool's one slot.
    assert!(
        holds_for(Duration::from_secs(1), async || h.tasks(&older).await["q"].state == TaskState::Pending).await,
        "{:?}",
        summary(&h, &older).await
    );
    h.restart_scheduler().await;

    for run in [&older, &newer] {
        assert_eq!(final_within(&h, run, Duration::from_secs(600)).await, RunState::Success);
    }
    let most = running.max.load(Ordering::SeqCst);
    assert!(
        most <= 1,
        "{most} tasks of pool `one` (1 slot) ran at once after the scheduler restarted: the older run's waiting \
         task was queued before the newer run's running task was loaded; journal {:?}",
        journal.entries()
    );
    h.stop().await;
}

/// Race 9, a queued run: a run waiting for a slot under `max_active_runs` when its DAG file is
/// removed and the scheduler restarts. The new scheduler knows the DAG only from the store (the
/// versions its runs were created with): the waiting run starts once the first one ends, under
/// the `max_active_runs` of its own version, and completes.
#[tokio::test(start_paused = true)]
async fn queued_runs_of_a_dag_whose_file_was_removed_before_a_scheduler_restart_start_and_complete() {
    let journal = Journal::default();
    let clock = clock();
    let a_done = Gate::default();
    let running = Arc::new(Concurrency::default());
    let dags = registry(vec![
        Dag::builder("doomed")
            .version("v1")
            .max_active_runs(1)
            .task(TaskSpec::rust("a", Step::new(&journal, &clock).gated(&a_done).counted(&running, Duration::ZERO)))
            .build()
            .unwrap(),
    ]);
    let mut h = Harness::start_live(dags.clone(), live(&dags)).await;
    let first = h.trigger("doomed").await;
    h.wait_task(&first, "a", |t| t.state == TaskState::Running).await;
    let second = h.trigger("doomed").await;
    assert_eq!(h.store.run(&second).await.unwrap().unwrap().state, RunState::Queued);
    h.dags = DagRegistry::new();
    h.live = Some(live(&h.dags));
    h.restart_scheduler().await;
    a_done.open();

    for run in [&first, &second] {
        let state = final_within(&h, run, Duration::from_secs(120)).await;
        assert_eq!(state, RunState::Success, "run {run} of the removed DAG: tasks {:?}", summary(&h, run).await);
    }
    assert_eq!(running.max.load(Ordering::SeqCst), 1, "the runs ran one at a time (max_active_runs = 1)");
    h.stop().await;
}

/// Race 9, a run only the store holds: its creation applied but answered an error (so it is
/// `queued` in the store and in no scheduler's queue), and the DAG file is removed before the
/// scheduler restarts. Recovery must queue the run under its DAG and start it.
#[tokio::test(start_paused = true)]
async fn a_queued_run_of_a_removed_dag_that_only_the_store_holds_starts_after_a_restart() {
    let journal = Journal::default();
    let clock = clock();
    let dags = registry(vec![
        Dag::builder("doomed").version("v1").task(TaskSpec::rust("a", Step::new(&journal, &clock))).build().unwrap(),
    ]);
    let mut h = Harness::start_live(dags.clone(), live(&dags)).await;
    h.scheduler_faults.store.creations_applied_then_failed.store(1, Ordering::SeqCst);
    assert!(h.scheduler.trigger("doomed", Default::default(), None).await.is_err(), "the answer was lost");
    let runs = h.store.unfinished_runs().await.unwrap();
    assert_eq!(runs.len(), 1, "the creation applied");
    let run = runs[0].run_id.clone();
    h.dags = DagRegistry::new();
    h.live = Some(live(&h.dags));
    h.restart_scheduler().await;

    let state = final_within(&h, &run, Duration::from_secs(120)).await;
    assert_eq!(state, RunState::Success, "the queued run of the removed DAG: tasks {:?}", summary(&h, &run).await);
    h.stop().await;
}
