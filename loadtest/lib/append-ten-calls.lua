-- The append script with 10 Redis calls instead of 13 (HMGET/HSET of the counter, SET NX GET for
-- the idempotency record, the tail's length kept in the counter with XADD NOMKSTREAM). Tried after
-- run 5 and not adopted: no cheaper (docs/benchmarks.md, "The append script"). Kept so that
-- loadtest/append-script-cost.sh can price it again (its last variant). Same KEYS and ARGV.
local epoch = redis.call('GET', KEYS[6])
if not epoch then return {-1} end
local counter = redis.call('HMGET', KEYS[1], 'e', 'n', 'tl', 'tb')
if counter[1] ~= epoch then return {-2} end
local seq = (tonumber(counter[2]) or 0) + 1
local prior = redis.call('SET', KEYS[5], seq .. ':' .. ARGV[1] .. ':' .. ARGV[6], 'NX', 'GET', 'PX', ARGV[13])
if prior then
  -- A write, so that a WAIT after this script also covers the original append.
  redis.call('PEXPIRE', KEYS[5], ARGV[13])
  local old_seq, msg_id, ts = string.match(prior, '^(%d+):([^:]+):(%d+)$')
  return {tonumber(old_seq), msg_id, tonumber(ts)}
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[16]) then
  redis.call('DEL', KEYS[5])
  return {-3}
end
local entry = {'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', seq, 'from', ARGV[3], 'to', ARGV[4],
  'body', ARGV[5], 'ts', ARGV[6]}
if ARGV[15] ~= '' then
  entry[#entry + 1] = 'tp'
  entry[#entry + 1] = ARGV[15]
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
local frame = ARGV[7] .. seq .. ARGV[8]
local len, bytes = tonumber(counter[3]), tonumber(counter[4]) or 0
local added = redis.pcall('XADD', KEYS[3], 'NOMKSTREAM', seq .. '-0', 'f', frame)
if not added then
  redis.call('XADD', KEYS[3], seq .. '-0', 'f', frame)
  len, bytes = 1, #frame
elseif not (type(added) == 'table' and added.err) then
  if len then len = len + 1 else len = redis.call('XLEN', KEYS[3]) end
  bytes = bytes + #frame
end
len = len or redis.call('XLEN', KEYS[3])
local max_len, max_bytes = tonumber(ARGV[11]), tonumber(ARGV[17])
if len > max_len + math.floor(max_len / 10) or bytes > max_bytes then
  local keep_bytes = math.floor(max_bytes * 9 / 10)
  local last, dropped, start, newest = nil, 0, '-', seq .. '-0'
  repeat
    local batch = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 100)
    local more = #batch == 100
    for _, e in ipairs(batch) do
      if len - dropped <= 1 or e[1] == newest or (len - dropped <= max_len and bytes <= keep_bytes) then
        more = false
        break
      end
      bytes = bytes - #e[2][2]
      dropped = dropped + 1
      last = e[1]
    end
    if last then start = '(' .. last end
  until not more
  if last then
    redis.call('XTRIM', KEYS[3], 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
    len = len - dropped
  end
end
redis.call('HSET', KEYS[1], 'n', seq, 'tl', len, 'tb', bytes)
redis.call('PEXPIRE', KEYS[3], ARGV[12])
if seq == 1 and ARGV[14] ~= '' then redis.call('SET', KEYS[4], ARGV[14]) end
local payload = ARGV[9] .. seq .. ARGV[10] .. '\n' .. frame
for i = 18, #ARGV do redis.call('PUBLISH', ARGV[i], payload) end
return {seq}
