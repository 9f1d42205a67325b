"""The Lua scripts behind a step's one read and one write (see store.py for the key layout).

Why scripts rather than pipelines: a step touches about a dozen keys; redis-py packs and parses
every pipelined command in Python (~15 us each), while a script is one command each way. Scripts
can also decide on the server: the cost fit and the policy are sent back only when they changed
since the caller last read them, and the write is atomic (the pooled prior's decay-and-add must be).

Every script names each key it touches in KEYS and touches no other, and a Redis Cluster runs it
only when all of them hash to one slot: the store's key prefix carries a hash tag in cluster mode
(`redis_connect.tagged_prefix`), so they do. The store's other writes are scripts too (no MULTI
pipelines), which run the same on one server, a Sentinel-named master and a cluster.
"""

# KEYS: history table, cost fit, pooled prior, policy, worker, then the pooled prior of each member
#       kind of a worker choosing proposers per request (none for any other worker)
# ARGV: 1 read the history table ('1'/'0'); 2 writer token of the stored fit the caller holds ('-' =
#       it holds none, '' = it holds one begun when none was stored);
#       3 policy stamp "version:updated_unix_ms" the caller holds ('' = none); 4 read worker figures
# Returns {table | nil, fit writer | nil, fit JSON | nil (unchanged or none), prior [4],
#          policy hash as a flat list | nil (unchanged), worker figures [3] | nil, member priors [[4]...]}
READ_STEP = """
local table_blob = false
if ARGV[1] == '1' then table_blob = redis.call('GET', KEYS[1]) end
local writer = redis.call('HGET', KEYS[2], 'writer')
local fit = false
if ARGV[2] == '-' or (writer or '') ~= ARGV[2] then fit = redis.call('HGET', KEYS[2], 'fit') end
local prior = redis.call('HMGET', KEYS[3], 'accepted', 'tested', 'proposed', 'requested')
local stamp = redis.call('HMGET', KEYS[4], 'version', 'updated_unix_ms')
local policy = false
if ((stamp[1] or '') .. ':' .. (stamp[2] or '')) ~= ARGV[3] then policy = redis.call('HGETALL', KEYS[4]) end
local worker = false
if ARGV[4] == '1' then worker = redis.call('HMGET', KEYS[5], 'pred_step_ms', 'pred_tokens', 'goodput_tok_s') end
local members = {}
for i = 6, #KEYS do
  members[#members + 1] = redis.call('HMGET', KEYS[i], 'accepted', 'tested', 'proposed', 'requested')
end
return {table_blob, writer, fit, prior, policy, worker, members}
"""

# KEYS: history table, cost fit, pooled prior, worker, workers, then each member kind's pooled prior
# ARGV: 1 table ('' = leave it), 2 table TTL; 3 fit JSON ('' = leave it), 4 its writer token, 5 fit TTL;
#       6 update the prior ('1'/'0'), 7 decay, 8-11 accepted, tested, proposed, requested to add,
#       12 prior TTL; 13 worker TTL, 14 now (ms), 15 worker id; 16-22 running totals to add, in
#       store.TOTAL_FIELDS order; 23-25 pred_step_ms, pred_tokens, goodput_tok_s ('' = none);
#       26 the hello's fields as a JSON object ('' = leave them); then 4 counts to add per member
#       prior key (KEYS[6], ...: ARGV[27-30], ...), each decayed by ARGV[7] first
# "prior = prior * decay + step evidence" runs here, atomically, so workers sharing a proposer kind
# never lose counts. Fields go positionally (not as name/value pairs): every argument costs the
# client a few us to pack.
RECORD_STEP = """
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2])) end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], 'fit', ARGV[3], 'writer', ARGV[4])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
local names = {'accepted', 'tested', 'proposed', 'requested'}
local function pool(key, decay, first)
  for i, name in ipairs(names) do
    local value = tonumber(redis.call('HGET', key, name) or '0') * decay + tonumber(ARGV[first + i])
    redis.call('HSET', key, name, tostring(value))
  end
  redis.call('EXPIRE', key, tonumber(ARGV[12]))
end
if ARGV[6] == '1' then pool(KEYS[3], tonumber(ARGV[7]), 7) end
for k = 6, #KEYS do pool(KEYS[k], tonumber(ARGV[7]), 26 + 4 * (k - 6)) end
local totals = {'steps', 'proposed', 'accepted', 'tested', 'generated', 'planned_k', 'planned_requests'}
for i, name in ipairs(totals) do
  if ARGV[15 + i] ~= '0' then redis.call('HINCRBY', KEYS[4], name, ARGV[15 + i]) end
end
local figures = {'pred_step_ms', 'pred_tokens', 'goodput_tok_s'}
local fields = {'last_seen_unix_ms', ARGV[14]}
for i, name in ipairs(figures) do
  if ARGV[22 + i] ~= '' then
    fields[#fields + 1] = name
    fields[#fields + 1] = ARGV[22 + i]
  end
end
if ARGV[26] ~= '' then
  for name, value in pairs(cjson.decode(ARGV[26])) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[13]))
redis.call('ZADD', KEYS[5], ARGV[14], ARGV[15])
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[13]))
return 1
"""

# Atomic compare-and-set of the active policy; returns {applied (0/1), version}.
SET_POLICY = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local expected = tonumber(ARGV[3])
if expected > 0 and expected ~= version then
  return {0, version}
end
version = version + 1
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'parameters', ARGV[2], 'version', version, 'updated_unix_ms', ARGV[4])
return {1, version}
"""

# KEYS: cost fit; ARGV: fit JSON, its writer token, TTL. A fit stored alone (a stream ending with
# unsaved steps).
WRITE_COST_FIT = """
redis.call('HSET', KEYS[1], 'fit', ARGV[1], 'writer', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS: worker, workers; ARGV: 1 start the totals from zero ('1'/'0'), 2 now (ms), 3 TTL, 4 worker id,
# 5 the hello's fields as a JSON object. A worker's hello.
REGISTER_WORKER = """
if ARGV[1] == '1' then redis.call('DEL', KEYS[1]) end
local fields = {}
for name, value in pairs(cjson.decode(ARGV[5])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
fields[#fields + 1] = 'last_seen_unix_ms'
fields[#fields + 1] = ARGV[2]
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""
