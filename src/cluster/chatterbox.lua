#!lua name=chatterbox
-- The cluster's functions (see src/cluster/mod.rs for the keys). Every function is one atomic
-- step; all of them are called with no declared keys (numkeys 0): one Redis, not a Redis
-- Cluster. Every event goes out on the one channel `cb:ev` as newline-separated fields.
--
-- A history entry (member of cb:h:{room}, score = id) is the stored JSON, then "\n" and the
-- sender's node, conn, serial and echo flag separated by "\n": the JSON never holds a raw
-- newline, so the first one ends it. The meta lets a node that heals a gap deliver the
-- message as the live one would have been (echo:false keeps working).

local EV = 'cb:ev'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Records are written by chatterbox (serde_json, `rooms` last) and room names are
-- [A-Za-z0-9_.-]: the rooms array is read and written as text, never through cjson (whose
-- numbers would lose digits of `order`).
local function record_rooms(record)
  local inner = string.match(record, ',"rooms":%[(.-)%]}$')
  local rooms = {}
  if inner then
    for r in string.gmatch(inner, '"([^"]*)"') do
      rooms[#rooms + 1] = r
    end
  end
  return rooms
end

local function with_rooms(record, rooms)
  local quoted = {}
  for i, r in ipairs(rooms) do
    quoted[i] = '"' .. r .. '"'
  end
  local head = string.match(record, '^(.*),"rooms":%[.-%]}$')
  if not head then
    return record
  end
  return head .. ',"rooms":[' .. table.concat(quoted, ',') .. ']}'
end

local function record_name(record)
  local name = string.match(record, '"name":"([^"]*)"')
  return string.lower(name or '')
end

-- Drops the name claim of node:conn if it still holds it.
local function drop_claim(record, node, conn)
  local lower = record_name(record)
  if redis.call('HGET', 'cb:names', lower) == node .. ':' .. conn then
    redis.call('HDEL', 'cb:names', lower)
  end
end

-- Announces and removes every member of `node`, then the node.
local function remove_node(node)
  local flat = redis.call('HGETALL', 'cb:m:' .. node)
  for i = 1, #flat, 2 do
    local conn, record = flat[i], flat[i + 1]
    drop_claim(record, node, conn)
    redis.call('PUBLISH', EV, 'd\n' .. node .. '\n' .. conn)
  end
  redis.call('DEL', 'cb:m:' .. node)
  redis.call('ZREM', 'cb:nodes', node)
end

local function cb_publish(keys, args)
  local room, msg_id, dedup_ms = args[1], args[2], tonumber(args[3])
  local node, conn, serial, echo, body = args[4], args[5], args[6], args[7], args[8]
  local per_room = tonumber(args[9])
  local dedup_key = 'cb:d:' .. room .. ':' .. msg_id
  if msg_id ~= '' then
    local first = redis.call('GET', dedup_key)
    if first then
      return { tonumber(first), 1 }
    end
  end
  local id = redis.call('INCR', 'cb:c:' .. room)
  local history = 'cb:h:' .. room
  local meta = node .. '\n' .. conn .. '\n' .. serial .. '\n' .. echo
  redis.call('ZADD', history, id, '{"id":' .. id .. body .. '\n' .. meta)
  redis.call('ZREMRANGEBYRANK', history, 0, -(per_room + 1))
  if msg_id ~= '' and dedup_ms > 0 then
    redis.call('SET', dedup_key, id, 'PX', dedup_ms)
  end
  redis.call('PUBLISH', EV, 'm\n' .. room .. '\n' .. id .. '\n' .. meta .. '\n' .. body)
  return { id, 0 }
end

local function cb_page(keys, args)
  local room, kind, bound, limit = args[1], args[2], tonumber(args[3]), tonumber(args[4])
  local history = 'cb:h:' .. room
  local counter = tonumber(redis.call('GET', 'cb:c:' .. room) or '0')
  local rows
  if kind == 'before' then
    local top = '+inf'
    if bound > 0 then
      top = '(' .. bound
    end
    rows = redis.call('ZREVRANGEBYSCORE', history, top, '-inf', 'LIMIT', 0, limit + 1)
  else
    rows = redis.call('ZRANGEBYSCORE', history, '(' .. bound, '+inf', 'LIMIT', 0, limit + 1)
  end
  local more = 0
  if #rows > limit then
    more = 1
    rows[#rows] = nil
  end
  local out = { counter, more }
  if kind == 'before' then
    for i = #rows, 1, -1 do
      out[#out + 1] = rows[i]
    end
  else
    for i = 1, #rows do
      out[#out + 1] = rows[i]
    end
  end
  return out
end

local function cb_connect(keys, args)
  local node, conn, lower, record = args[1], args[2], args[3], args[4]
  local holder = redis.call('HGET', 'cb:names', lower)
  local me = node .. ':' .. conn
  if holder and holder ~= me then
    return 0
  end
  redis.call('HSET', 'cb:names', lower, me)
  redis.call('HSET', 'cb:m:' .. node, conn, record)
  redis.call('PUBLISH', EV, 'c\n' .. node .. '\n' .. with_rooms(record, {}))
  for _, room in ipairs(record_rooms(record)) do
    redis.call('PUBLISH', EV, 'j\n' .. node .. '\n' .. conn .. '\n' .. room)
  end
  return 1
end

local function cb_disconnect(keys, args)
  local node, conn = args[1], args[2]
  local record = redis.call('HGET', 'cb:m:' .. node, conn)
  if not record then
    return 0
  end
  drop_claim(record, node, conn)
  redis.call('HDEL', 'cb:m:' .. node, conn)
  redis.call('PUBLISH', EV, 'd\n' .. node .. '\n' .. conn)
  return 1
end

local function change_room(args, join)
  local node, conn, room = args[1], args[2], args[3]
  local key = 'cb:m:' .. node
  local record = redis.call('HGET', key, conn)
  if not record then
    return 0
  end
  local rooms, kept, found = record_rooms(record), {}, false
  for _, r in ipairs(rooms) do
    if r == room then
      found = true
      if join then
        kept[#kept + 1] = r
      end
    else
      kept[#kept + 1] = r
    end
  end
  if join and not found then
    kept[#kept + 1] = room
  end
  redis.call('HSET', key, conn, with_rooms(record, kept))
  local tag = 'l'
  if join then
    tag = 'j'
  end
  redis.call('PUBLISH', EV, tag .. '\n' .. node .. '\n' .. conn .. '\n' .. room)
  return 1
end

local function cb_join(keys, args)
  return change_room(args, true)
end

local function cb_leave(keys, args)
  return change_room(args, false)
end

-- Replaces the node's members with the ones given, and tells the other nodes the difference
-- (calls made while Redis was unreachable were lost, and the node may have been reaped).
local function cb_register(keys, args)
  local node = args[1]
  local key = 'cb:m:' .. node
  redis.call('ZADD', 'cb:nodes', now_ms(), node)
  local old = {}
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    old[flat[i]] = flat[i + 1]
    drop_claim(flat[i + 1], node, flat[i])
  end
  redis.call('DEL', key)
  local taken = {}
  local kept = {}
  for i = 2, #args - 2, 3 do
    local conn, lower, record = args[i], args[i + 1], args[i + 2]
    local holder = redis.call('HGET', 'cb:names', lower)
    if holder and holder ~= node .. ':' .. conn then
      taken[#taken + 1] = tonumber(conn)
    else
      redis.call('HSET', 'cb:names', lower, node .. ':' .. conn)
      redis.call('HSET', key, conn, record)
      kept[conn] = true
      local before = old[conn]
      local had = {}
      if before then
        for _, r in ipairs(record_rooms(before)) do
          had[r] = true
        end
      else
        redis.call('PUBLISH', EV, 'c\n' .. node .. '\n' .. with_rooms(record, {}))
      end
      local now = {}
      for _, r in ipairs(record_rooms(record)) do
        now[r] = true
        if not had[r] then
          redis.call('PUBLISH', EV, 'j\n' .. node .. '\n' .. conn .. '\n' .. r)
        end
      end
      for r, _ in pairs(had) do
        if not now[r] then
          redis.call('PUBLISH', EV, 'l\n' .. node .. '\n' .. conn .. '\n' .. r)
        end
      end
    end
  end
  for conn, _ in pairs(old) do
    if not kept[conn] then
      redis.call('PUBLISH', EV, 'd\n' .. node .. '\n' .. conn)
    end
  end
  return taken
end

local function cb_beat(keys, args)
  local node = args[1]
  local epoch = redis.call('GET', 'cb:epoch') or ''
  if not redis.call('ZSCORE', 'cb:nodes', node) then
    return { epoch, 0 }
  end
  redis.call('ZADD', 'cb:nodes', 'XX', now_ms(), node)
  return { epoch, 1 }
end

local function cb_reap(keys, args)
  local me, timeout = args[1], tonumber(args[2])
  local dead = redis.call('ZRANGEBYSCORE', 'cb:nodes', '-inf', '(' .. (now_ms() - timeout))
  local reaped = {}
  for _, node in ipairs(dead) do
    if node ~= me then
      remove_node(node)
      reaped[#reaped + 1] = node
    end
  end
  return reaped
end

local function cb_epoch(keys, args)
  redis.call('SET', 'cb:epoch', args[1], 'NX')
  return redis.call('GET', 'cb:epoch')
end

local function cb_raise(keys, args)
  for i = 1, #args - 1, 2 do
    local key = 'cb:c:' .. args[i]
    local id = tonumber(args[i + 1])
    if tonumber(redis.call('GET', key) or '0') < id then
      redis.call('SET', key, id)
    end
  end
  return 1
end

local function cb_unregister(keys, args)
  remove_node(args[1])
  return 1
end

-- Every record of the other nodes, and a mark on the channel at the same instant: the engine
-- applies the snapshot where the mark falls among the live events.
local function cb_snapshot(keys, args)
  local me, nonce = args[1], args[2]
  local out = {}
  for _, node in ipairs(redis.call('ZRANGE', 'cb:nodes', 0, -1)) do
    if node ~= me then
      for _, record in ipairs(redis.call('HVALS', 'cb:m:' .. node)) do
        out[#out + 1] = record
      end
    end
  end
  redis.call('PUBLISH', EV, 's\n' .. me .. '\n' .. nonce)
  return out
end

local function cb_names(keys, args)
  local count = tonumber(args[1])
  return redis.call('INCRBY', 'cb:autoname', count) - count + 1
end

local function cb_remove(keys, args)
  local room, what, id = args[1], args[2], args[3]
  local low = id
  if what == 'upto' then
    low = '-inf'
  end
  return redis.call('ZREMRANGEBYSCORE', 'cb:h:' .. room, low, id)
end

redis.register_function('cb_publish', cb_publish)
redis.register_function { function_name = 'cb_page', callback = cb_page, flags = { 'no-writes' } }
redis.register_function('cb_connect', cb_connect)
redis.register_function('cb_disconnect', cb_disconnect)
redis.register_function('cb_join', cb_join)
redis.register_function('cb_leave', cb_leave)
redis.register_function('cb_register', cb_register)
redis.register_function('cb_beat', cb_beat)
redis.register_function('cb_reap', cb_reap)
redis.register_function('cb_epoch', cb_epoch)
redis.register_function('cb_raise', cb_raise)
redis.register_function('cb_unregister', cb_unregister)
redis.register_function('cb_snapshot', cb_snapshot)
redis.register_function('cb_names', cb_names)
redis.register_function('cb_remove', cb_remove)
