-- wrk script for bench.compare: POST a different body each time, built from a file of sentences.
--   BENCH_TEXTS=texts.jsonl BENCH_PATH=/v1/models/minilm/predict wrk -s bench/wrk/post.lua ...
-- BENCH_TEXTS holds one JSON string a line (bench.compare.write_bodies). A body is
-- BENCH_BODY_PREFIX .. BENCH_INPUTS (default 1) consecutive sentences joined by commas ..
-- BENCH_BODY_SUFFIX; the default prefix and suffix make {"inputs": [...]} (ddml, naive, mosec,
-- streamer), and bench.compare passes '{"model": "minilm", "input": [' and ']}' for infinity
-- (bench.openloop.SHAPES). Each wrk thread starts at its own offset, so threads do not send the
-- same sentences in step. done() prints one JSON line that bench.compare reads (latency in
-- microseconds).

local texts = {}
local position = 0
local path = os.getenv("BENCH_PATH") or "/"
local prefix = os.getenv("BENCH_BODY_PREFIX") or '{"inputs": ['
local suffix = os.getenv("BENCH_BODY_SUFFIX") or ']}'
local inputs = tonumber(os.getenv("BENCH_INPUTS") or "1")
local headers = { ["Content-Type"] = "application/json" }
local threads = {}
local next_id = 0

function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
    table.insert(threads, thread)
end

function init(args)
    for line in io.lines(os.getenv("BENCH_TEXTS")) do
        texts[#texts + 1] = line
    end
    if inputs > #texts then
        error("BENCH_INPUTS is larger than the number of sentences in BENCH_TEXTS")
    end
    position = (id * 7919) % #texts
end

function request()
    if position + inputs > #texts then
        position = 0
    end
    local body = prefix .. table.concat(texts, ",", position + 1, position + inputs) .. suffix
    position = position + inputs
    return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '\nBENCH_RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
        '"timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
        summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
