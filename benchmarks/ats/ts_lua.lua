-- hostscript bench --ats: the same work as hostscript.lua for tslua.so, loaded as a
-- global plugin (plugin.config: tslua.so ts_lua.lua), whose do_global_<hook>
-- functions run on Traffic Server's global hooks.
function do_global_read_request()
  local h = ts.client_request.header
  h['X-Bench-Client'] = (h['User-Agent'] or '-') .. '@' .. (h['Host'] or '-')
  return 0
end

function do_global_send_request()
  ts.server_request.header['X-Bench-Send'] = '1'
  return 0
end

function do_global_send_response()
  ts.client_response.header['X-Bench-Out'] = '1'
  return 0
end
