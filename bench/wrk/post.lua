-- wrk script for bench.compare: POST a different body each time, from a file of JSON bodies.
--   BENCH_BODIES=bodies.jsonl BENCH_PATH=/v1/models/minilm/predict wrk -s bench/wrk/post.lua ...
-- Each wrk thread starts at its own offset, so threads do not send the same sentences in step.
-- done() prints one JSON line that bench.compare reads (latency in microseconds).

local bodies = {}
local position = 0
local path = os.getenv("BENCH_PATH") or "/"
local headers = { ["Content-Type"] = "application/json" }
local threads = {}
local next_id = 0

function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
    table.insert(threads, thread)
end

function init(args)
    for line in io.lines(os.getenv("BENCH_BODIES")) do
        bodies[#bodies + 1] = line
    end
    position = (id * 7919) % #bodies
end

function request()
    position = position % #bodies + 1
    return wrk.format("POST", path, headers, bodies[position])
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '\nBENCH_RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
        '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
        summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
