-- The W rows' script: one handler on each of the middleware's three hooks, each doing
-- a little of what handlers do (read a header, set one, note something for the log).
local C = {}

function C:on_read_request(txn)
  local ua = txn.req.headers["user-agent"]
  txn.req.headers["x-client"] = ua and ua:sub(1, 16) or "none"
end

function C:on_send_response(txn)
  txn.resp.headers["x-served-by"] = "hostscript"
end

function C:on_log(txn)
  txn.ctx.logged = txn.resp.status
end

return C
