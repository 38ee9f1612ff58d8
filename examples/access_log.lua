-- AccessLog: one line per request in the log hook, with a per-thread request count
-- (module-level state lives in each worker thread's own Lua state).
local AccessLog = {}
AccessLog.__index = AccessLog

function AccessLog.new()
  return setmetatable({ served = 0 }, AccessLog)
end

function AccessLog:on_log(txn)
  self.served = self.served + 1
  hs.log.info(txn.req.method, txn.req.uri, txn.resp.status or "-",
              "campaign=" .. tostring(txn.ctx.campaign), "thread-served=" .. self.served)
end

return AccessLog
