-- wrk script for `chatlog bench`: POST batches of text.delta to many
-- conversations, each with an open turn "bench-turn", round robin.
--   wrk ... -s post.lua <url> -- <file of conversation ids> <batch>
-- With CHATLOG_WRK_RATE=<requests/s per wrk thread> it paces requests open-loop:
-- each request claims the next slot of a fixed schedule (1000/rate ms apart),
-- whatever the answers' latency, so a slow server shows as a rate below the
-- offered one instead of a slower schedule.

local ids, batch, counter = {}, 1, 0
local threads = {}
unavailable, failed = 0, 0  -- per thread: 503 answers (backpressure, nothing written), other non-2xx

function setup(thread)
  thread:set("thread_id", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  batch = tonumber(args[2])
  local events = {}
  for k = 1, batch do
    events[k] = '{"type":"text.delta","data":{"turn_id":"bench-turn","text":" tok' .. k .. '"}}'
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"events":[' .. table.concat(events, ",") .. ']}'
  counter = (thread_id or 0) * 7919
end

function request()
  counter = counter + 1
  return wrk.format(nil, "/v1/conversations/" .. ids[(counter % #ids) + 1] .. "/events")
end

local rate = tonumber(os.getenv("CHATLOG_WRK_RATE") or "")
if rate and rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } chatlog_timespec;
    int clock_gettime(int clock_id, chatlog_timespec *tp);
  ]]
  local ts = ffi.new("chatlog_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval, next_at = 1000 / rate, nil

  function delay()
    local now = now_ms()
    if next_at == nil then next_at = now end
    next_at = next_at + interval
    local wait = next_at - now
    if wait < 0 then return 0 end
    return wait
  end
end

function response(status, headers, body)
  if status == 503 then
    unavailable = unavailable + 1
  elseif status >= 300 then
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local u, f = 0, 0
  for _, t in ipairs(threads) do
    u = u + t:get("unavailable")
    f = f + t:get("failed")
  end
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "unavailable": %d, "failed": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), u, f))
end
