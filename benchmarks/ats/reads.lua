-- python benchmarks/ats.py --decompose: hostscript.lua's reads without its writes.
local Reads = {}
local last
function Reads:on_read_request(txn)
  local h = txn.req.headers
  last = (h["user-agent"] or "-") .. "@" .. (h["host"] or "-")
end
function Reads:on_send_request(txn) end
function Reads:on_send_response(txn) end
return Reads
