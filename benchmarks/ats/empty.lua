-- python benchmarks/ats.py --decompose: hostscript.lua's hooks with nothing in them
-- (what the plugin costs before any work).
local Empty = {}
function Empty:on_read_request(txn) end
function Empty:on_send_request(txn) end
function Empty:on_send_response(txn) end
return Empty
