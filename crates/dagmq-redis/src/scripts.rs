//! The Lua scripts behind the store's atomic operations. The task scripts touch keys of one run
//! only, all sharing the run's hash tag; run creation and run moves also write the listing
//! indexes (`P:runs...`) and the lease key, so the store needs one Redis primary (Sentinel, not
//! Redis Cluster). Scripts read JSON with
//! cjson but never re-encode it (cjson turns empty arrays into objects): they compare and then
//! store the JSON the caller sent.
//!
//! A task compare-and-set reads only the state and try of the stored instance. serde writes
//! `task_id`, `state` and `try_number` first, and task ids hold no quotes, so an anchored pattern
//! finds both without decoding the whole instance (whose upstream list can be long); anything
//! else is decoded with cjson.

/// The fencing prelude of every script a scheduler writes with: takes the fence (the lease term
/// as `TERM:HOLDER`, or empty for writers that need none) off the front of ARGV and the lease
/// key off the end of KEYS, so the rest of the script sees its own layout, and refuses the write
/// unless that term is still the one in force. The lease key expires with the term, so a term
/// that has expired refuses its writes too, even when no other term was granted since.
macro_rules! fenced {
    ($($body:expr),+) => {
        concat!(
            r#"
local fence = table.remove(ARGV, 1)
local lease_key = table.remove(KEYS)
if fence ~= '' and redis.call('GET', lease_key) ~= fence then
  return redis.error_reply('DAGMQ_FENCED the scheduler lease term has ended')
end
"#,
            $($body),+
        )
    };
}

/// Wraps a task script with `head(json)`, which answers a stored instance's state and try (as
/// text).
macro_rules! task_script {
    ($($body:expr),+) => {
        concat!(
            r#"
local function head(json)
  local state, try = string.match(json, '^{"task_id":"[^"]*","state":"([%a_]+)","try_number":(%d+)[,}]')
  if state then return state, try end
  local task = cjson.decode(json)
  return task.state, tostring(task.try_number)
end
"#,
            $($body),+
        )
    };
}

/// Compare-and-set of one task. KEYS[1] tasks hash. ARGV: task id, expected state, expected try,
/// new JSON. Returns 1 when applied, 0 when the state or try differ or the task is unknown.
pub(crate) const TRANSITION_TASK: &str = fenced!(task_script!(
    r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local state, try = head(current)
if state ~= ARGV[2] or try ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"#
));

/// The body of [`CLAIM_TRY`], shared with [`FINISH_AND_CLAIM`], which runs it as a function
/// after its own first step.
macro_rules! claim_body {
    () => {
        r#"
local answer = {}
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  answer[1] = '0'
  answer[2] = false
  answer[3] = false
else
  local state, try = head(current)
  local prefix = '{"task_id":"' .. ARGV[1] .. '","state":"queued"'
  local meta
  if state == 'queued' and try == ARGV[2] then meta = redis.call('GET', KEYS[2]) end
  if state ~= 'queued' or try ~= ARGV[2] then
    answer[1] = '2'
    answer[2] = current
  elseif not meta or cjson.decode(meta).state ~= 'running' then
    answer[1] = '4'
    answer[2] = current
  elseif string.sub(current, 1, #prefix) ~= prefix or string.sub(current, -1) ~= '}' then
    answer[1] = '3'
    answer[2] = current
  else
    local task = cjson.decode(current)
    if task.started_at ~= nil or task.worker ~= nil or task.worker_instance ~= nil or task.progress ~= nil then
      answer[1] = '3'
      answer[2] = current
    else
      local claimed = '{"task_id":"' .. ARGV[1] .. '","state":"running"' .. string.sub(current, #prefix + 1, -2) .. ARGV[3] .. '}'
      redis.call('HSET', KEYS[1], ARGV[1], claimed)
      answer[1] = '1'
      answer[2] = claimed
    end
  end
  answer[3] = redis.call('HGET', KEYS[1], ARGV[1] .. '#progress')
end
for i = 4, #ARGV do
  answer[#answer + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  answer[#answer + 1] = redis.call('HGET', KEYS[1], ARGV[i] .. '#progress')
end
return answer
"#
    };
}

/// A worker claims a try and reads other tasks, in one step. KEYS[1] tasks hash, KEYS[2] the
/// run's meta. ARGV: task id, try, the claim's fields as JSON members
/// (`,"started_at":...,"worker":...,"worker_instance":...`), then the ids of tasks to read. When
/// the task is `queued` at that try and the run is `running`, with the task's state first after
/// its id (serde's order) and none of the claim's fields or a progress of its own, the claim is
/// made here by rewriting the state and appending the fields (no re-encoding, so the rest of the
/// instance stays byte for byte); otherwise nothing is written. Answers a code (`0` unknown
/// task, `1` claimed, `2` not claimable, `3` claimable but not in that shape: the caller claims
/// with a compare-and-set, `4` queued at that try but the run is not `running`, or gone), the
/// task's JSON after the call (or nil), the task's `#progress` field, then the JSON and
/// `#progress` field of each task read. The run is read only for a claimable try, so a claim of
/// the caller's whose answer was lost is found (`2`, running under it) whatever the run's state.
pub(crate) const CLAIM_TRY: &str = task_script!(claim_body!());

/// A worker records a finished try's outcome and claims its slot's next try, of the same run,
/// in one step (`Store::finish_and_claim`). KEYS[1] tasks hash, KEYS[2] the run's meta. ARGV:
/// the finished task's id, its try, its new JSON, then [`CLAIM_TRY`]'s arguments for the next
/// try. The outcome applies when the task is still `running` at that try; the claim is then
/// made, or not, exactly as [`CLAIM_TRY`] makes it, whether or not the outcome applied.
/// Answers `1` or `0` (whether the outcome applied) followed by [`CLAIM_TRY`]'s answer.
pub(crate) const FINISH_AND_CLAIM: &str = task_script!(
    r#"
local applied = '0'
local done = redis.call('HGET', KEYS[1], ARGV[1])
if done then
  local state, try = head(done)
  if state == 'running' and try == ARGV[2] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
    applied = '1'
  end
end
table.remove(ARGV, 1)
table.remove(ARGV, 1)
table.remove(ARGV, 1)
local function claim()
"#,
    claim_body!(),
    r#"
end
local claimed = claim()
table.insert(claimed, 1, applied)
return claimed
"#
);

/// A worker records a finished try and, when it is a success in a running run, claims the
/// downstream candidates that are ready (eager dispatch), in one step. KEYS[1] tasks hash,
/// KEYS[2] the run's meta. ARGV: task id, try, new JSON, whether it holds follow-ups (`1` or
/// `0`, from the instance the store was given), then per candidate: task id, the JSON
/// the worker read (a claim applies only if the stored instance is still exactly that), the
/// JSON of the claimed try, the number of its upstream tasks and their ids, the number of those
/// that are branch tasks and their ids, the number of tasks to read should it be claimed and
/// their ids. A candidate is ready when each upstream is `success` and has no follow-ups, or has
/// them all among the candidate's upstreams already (the parent's id, a dot, the follow-up's
/// id), and each branch upstream's output names it (alone or in a list): `Store::finish_try`
/// and `EagerClaim::upstreams_allow`. The task just finished is decoded only when it holds
/// follow-ups (so a chain costs no search); another upstream only when its JSON holds
/// `_ups":[` (as `"follow_ups":[` does; serde writes no empty list): the search stops at each
/// `_`, rarer in JSON than the `"` of every string, so it stays cheap over a large output. A
/// branch upstream is always decoded. Answers `{'0'}`
/// when the outcome did not apply, else `{'1', ...}` followed, for each candidate claimed, by
/// its number (from 1), how many tasks were read for it, and the JSON of each (nil for an
/// unknown one).
pub(crate) const FINISH_TRY: &str = task_script!(
    r#"
local function follow_ups_added(id, json, at, ups)
  local follow_ups = cjson.decode(json).follow_ups
  if type(follow_ups) ~= 'table' then return true end
  for _, f in ipairs(follow_ups) do
    local wanted, found = id .. '.' .. tostring(f.id), false
    for k = 1, ups do
      if ARGV[at + 3 + k] == wanted then
        found = true
        break
      end
    end
    if not found then return false end
  end
  return true
end
local function chose(json, id)
  if not json then return false end
  local output = cjson.decode(json).output
  if output == id then return true end
  if type(output) ~= 'table' then return false end
  for _, chosen in ipairs(output) do
    if chosen == id then return true end
  end
  return false
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return {'0'} end
local state, try = head(current)
if state ~= 'running' or try ~= ARGV[2] then return {'0'} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local answer = {'1'}
if #ARGV < 5 or head(ARGV[3]) ~= 'success' then return answer end
local meta = redis.call('GET', KEYS[2])
if not meta or cjson.decode(meta).state ~= 'running' then return answer end
local at, n = 5, 0
while at <= #ARGV do
  n = n + 1
  local ups = tonumber(ARGV[at + 3])
  local branches_at = at + 4 + ups
  local branches = tonumber(ARGV[branches_at])
  local reads_at = branches_at + 1 + branches
  local reads = tonumber(ARGV[reads_at])
  local ready = redis.call('HGET', KEYS[1], ARGV[at]) == ARGV[at + 1]
  local stored = {}
  for k = 1, ups do
    if not ready then break end
    local id = ARGV[at + 3 + k]
    local up = redis.call('HGET', KEYS[1], id)
    ready = up ~= false and head(up) == 'success'
    local expanding
    if id == ARGV[1] then
      expanding = ARGV[4] == '1'
    else
      expanding = ready and string.find(up, '_ups":[', 1, true)
    end
    if ready and expanding then ready = follow_ups_added(id, up, at, ups) end
    if branches > 0 then stored[id] = up end
  end
  for k = 1, branches do
    if not ready then break end
    local id = ARGV[branches_at + k]
    local up = stored[id]
    if up == nil then up = redis.call('HGET', KEYS[1], id) end
    ready = chose(up, ARGV[at])
  end
  if ready then
    redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 2])
    answer[#answer + 1] = tostring(n)
    answer[#answer + 1] = tostring(reads)
    for k = 1, reads do
      answer[#answer + 1] = redis.call('HGET', KEYS[1], ARGV[reads_at + k])
    end
  end
  at = reads_at + 1 + reads
end
return answer
"#
);

/// Several compare-and-sets of one run's tasks. KEYS[1] tasks hash. ARGV: groups of task id,
/// expected state, expected try, new JSON. Answers 1 or 0 for each group, in order.
pub(crate) const TRANSITION_TASKS: &str = fenced!(task_script!(
    r#"
local applied = {}
for i = 1, #ARGV, 4 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local ok = 0
  if current then
    local state, try = head(current)
    if state == ARGV[i + 1] and try == ARGV[i + 2] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 3])
      ok = 1
    end
  end
  applied[#applied + 1] = ok
end
return applied
"#
));

/// Compare-and-set of a run record, with its index entries, in one step. KEYS[1] meta,
/// KEYS[2] tasks hash, KEYS[3] the run's set of log keys, KEYS[4] the unfinished index,
/// KEYS[5] the runs index, KEYS[6] the DAG's runs index, KEYS[7] the hash of the DAG version
/// the run names, KEYS[8..10] the indexes of finished runs by state (success, failed,
/// cancelled: a finished run is in its state's and no other). ARGV: expected state, new JSON, retention seconds (0: keep), run id, score,
/// horizon at or below which runs leave the runs and state indexes and the DAG's (-1: none;
/// unfinished runs stay in the unfinished index), then groups of task id,
/// expected state, expected try, new JSON applied as compare-and-sets once the run's applies (a
/// restart). Returns 1 when applied.
///
/// A stored version lists its unfinished runs (`run:ID` fields beside `dag`): it is kept while
/// it has one, and expires with the retention period once the last of them finished, so it
/// outlives every run that names it.
pub(crate) const TRANSITION_RUN: &str = fenced!(task_script!(
    r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local run = cjson.decode(current)
if run.state ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
for i = 7, #ARGV, 4 do
  local task = redis.call('HGET', KEYS[2], ARGV[i])
  if task then
    local state, try = head(task)
    if state == ARGV[i + 1] and try == ARGV[i + 2] then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 3]) end
  end
end
local retention = tonumber(ARGV[3])
local new_state = cjson.decode(ARGV[2]).state
local final = new_state == 'success' or new_state == 'failed' or new_state == 'cancelled'
for i = 1, 3 do
  if final and retention > 0 then
    redis.call('EXPIRE', KEYS[i], retention)
  else
    redis.call('PERSIST', KEYS[i])
  end
end
if final and retention > 0 then
  for _, log in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('EXPIRE', log, retention) end
else
  for _, log in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('PERSIST', log) end
end
if redis.call('HEXISTS', KEYS[7], 'dag') == 1 then
  if final then
    redis.call('HDEL', KEYS[7], 'run:' .. ARGV[4])
    if retention > 0 and redis.call('HLEN', KEYS[7]) == 1 then redis.call('EXPIRE', KEYS[7], retention) end
  else
    redis.call('HSET', KEYS[7], 'run:' .. ARGV[4], '1')
    redis.call('PERSIST', KEYS[7])
  end
end
local by_state = {success = KEYS[8], failed = KEYS[9], cancelled = KEYS[10]}
for state, index in pairs(by_state) do
  if state == new_state then
    redis.call('ZADD', index, ARGV[5], ARGV[4])
  else
    redis.call('ZREM', index, ARGV[4])
  end
end
if final then
  redis.call('ZREM', KEYS[4], ARGV[4])
  -- Back in the listings if another run's horizon trimmed it while it ran longer than the
  -- retention period: a finished run is in the runs, DAG and state indexes alike. Its own
  -- horizon is below its score.
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[6], ARGV[5], ARGV[4])
  if tonumber(ARGV[6]) >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[6])
    for _, index in pairs(by_state) do redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[6]) end
  end
else
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[6], ARGV[5], ARGV[4])
end
return 1
"#
));

/// Adds finished runs to the indexes of their states, each at its score in the runs index and
/// only while it is there (the one-time build of those indexes, `index_finished_runs`: a run a
/// finishing run's horizon trimmed after the build read it stays out). KEYS[1] the runs index,
/// KEYS[2..4] the indexes of successful, failed and cancelled runs. ARGV: pairs of run id and
/// state. Returns how many were added or updated.
pub(crate) const INDEX_FINISHED: &str = r#"
local by_state = {success = KEYS[2], failed = KEYS[3], cancelled = KEYS[4]}
local added = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local index = by_state[ARGV[i + 1]]
  if score and index then
    redis.call('ZADD', index, score, ARGV[i])
    added = added + 1
  end
end
return added
"#;

/// Creates a run with its index entries and idempotency key, in one step, so no crash or
/// timeout can leave a run that listings and recovery never see, or a key without its run.
/// KEYS[1] meta, KEYS[2] tasks hash, KEYS[3] runs index, KEYS[4] the DAG's runs index,
/// KEYS[5] unfinished index, KEYS[6] the idempotency key (or an unused name), KEYS[7] the hash
/// of the DAG version the run names (or an unused name). ARGV: run JSON, run id, score, whether
/// there is a key (1/0), key lifetime in seconds (0: none), the meta key of a run id as prefix
/// and suffix, whether the run names a version (1/0), then task id and JSON pairs. Answers `+`
/// when created, `=` when a run with this id exists, the id of the run the key names, or `!`
/// when the version is not stored (nothing is written). A created run is listed in its version
/// (see `TRANSITION_RUN`).
pub(crate) const CREATE_RUN: &str = fenced!(
    r#"
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing and redis.call('EXISTS', ARGV[6] .. existing .. ARGV[7]) == 1 then return existing end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return '=' end
if ARGV[8] == '1' then
  if redis.call('HEXISTS', KEYS[7], 'dag') == 0 then return '!' end
  redis.call('HSET', KEYS[7], 'run:' .. ARGV[2], '1')
  redis.call('PERSIST', KEYS[7])
end
redis.call('SET', KEYS[1], ARGV[1])
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[2])
if ARGV[4] == '1' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[5])
  else
    redis.call('SET', KEYS[6], ARGV[2])
  end
end
return '+'
"#
);

/// Adds follow-up tasks and rewires downstream tasks. KEYS[1] tasks hash. ARGV: count of new
/// tasks, then (id, JSON) pairs of new tasks, then (id, expected state, expected try, JSON)
/// quadruples of rewired tasks. Nothing happens when a new id exists already.
pub(crate) const ADD_TASKS: &str = fenced!(task_script!(
    r#"
local count = tonumber(ARGV[1])
for i = 0, count - 1 do
  if redis.call('HEXISTS', KEYS[1], ARGV[2 + i * 2]) == 1 then return 0 end
end
for i = 0, count - 1 do redis.call('HSET', KEYS[1], ARGV[2 + i * 2], ARGV[3 + i * 2]) end
local at = 2 + count * 2
while at <= #ARGV do
  local current = redis.call('HGET', KEYS[1], ARGV[at])
  if current then
    local state, try = head(current)
    if state == ARGV[at + 1] and try == ARGV[at + 2] then
      redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 3])
    end
  end
  at = at + 4
end
return 1
"#
));

/// Records progress of a running try. KEYS[1] tasks hash. ARGV: task id, try, progress.
pub(crate) const SET_PROGRESS: &str = task_script!(
    r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local state, try = head(current)
if state ~= 'running' or try ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1] .. '#progress', ARGV[2] .. ':' .. ARGV[3])
return 1
"#
);

/// Appends log lines under a cap. KEYS[1] log list, KEYS[2] the run's set of log keys.
/// ARGV: cap, marker, lines...
pub(crate) const APPEND_LOG: &str = r#"
local cap = tonumber(ARGV[1])
local marker = ARGV[2]
redis.call('SADD', KEYS[2], KEYS[1])
local length = redis.call('LLEN', KEYS[1])
for i = 3, #ARGV do
  if length >= cap then
    if redis.call('LINDEX', KEYS[1], -1) ~= marker then redis.call('RPUSH', KEYS[1], marker) end
    return length
  end
  redis.call('RPUSH', KEYS[1], ARGV[i])
  length = length + 1
end
return length
"#;

/// Grants a new term of the scheduler lease if it is free (no term in force, or the holder's
/// own). KEYS[1] lease key, KEYS[2] the number of the last term granted. ARGV: holder, ttl in
/// milliseconds. Answers the new term's number, or 0 when another holder's term is in force.
pub(crate) const ACQUIRE_LEASE: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local colon = string.find(current, ':', 1, true)
  if not colon or string.sub(current, colon + 1) ~= ARGV[1] then return 0 end
end
local term = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], term .. ':' .. ARGV[1], 'PX', ARGV[2])
return term
"#;

/// Extends the term in force if it is the caller's. KEYS[1] lease key. ARGV: the term as
/// `TERM:HOLDER`, ttl in milliseconds. Answers 1 when extended, 0 when that term has ended.
pub(crate) const RENEW_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Gives the lease up if the term is in force. KEYS[1] lease key. ARGV: the term as
/// `TERM:HOLDER`.
pub(crate) const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Stores a DAG version, fenced. KEYS[1] the version hash (then the lease key). ARGV: fence,
/// JSON, retention seconds (0: keep). The version lives as long as its runs (see
/// `TRANSITION_RUN`); one that lists no unfinished run expires after the retention period.
pub(crate) const PUT_DAG_VERSION: &str = fenced!(
    r#"
redis.call('HSET', KEYS[1], 'dag', ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('HLEN', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"#
);

/// Writes a string value, fenced. KEYS[1] the key (then the lease key). ARGV: fence, value.
pub(crate) const PUT_FENCED: &str = fenced!(
    r#"
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#
);

/// Removes a hash field, fenced. KEYS[1] the hash (then the lease key). ARGV: fence, field.
pub(crate) const HDEL_FENCED: &str = fenced!(
    r#"
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#
);

/// Records a worker's heartbeat with the server's time. KEYS[1] workers hash, KEYS[2] hash of
/// heartbeat times (milliseconds by the server's clock). ARGV: name, entry JSON.
pub(crate) const HEARTBEAT: &str = r#"
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], tostring(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
return 1
"#;
