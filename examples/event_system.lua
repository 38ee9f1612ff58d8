-- Event system: a handler that turns other handlers on while the server runs (the
-- EventSystem example of ts_mruby, where a script registers a handler class for
-- the later hooks of a transaction), with hs.register (docs/register.md).
--
--   read_request: the first request carrying the header `x-event-system: on`
--                 that a thread sees registers the class Events, named
--                 "<this script's name>#events" (examples/event_system.lua#events
--                 when loaded as examples/event_system.lua). Nothing else changes
--                 a request.
--
-- Events, once registered, runs on every thread of the host from each thread's
-- next fire on, for every request (not only those that carry the header), and adds
-- one header per hook it handles:
--
--   send_request:  x-on_send_request   on the request as it goes to the origin
--   read_response: x-on_read_response  on the response as read from the origin
--                                      (before it is cached: a cache hit keeps it)
--   send_response: x-on_send_response  on the response the client gets
--
-- Each says EVENTS_VERSION: a value of the script's, travelling with the class to
-- every thread, like the table of header names and the helper function the three
-- methods share (a class registered at run time is serialized once and rebuilt in
-- each thread's state; its upvalues of plain data cross as copies).
--
-- The request that turns Events on finishes its read_request on the program it
-- started with; each fire after it, on any thread, runs Events (the host logs the
-- registration). That includes the trigger's own later hooks when the server fires
-- them: the reference proxy fires only the hooks some script handled when the
-- request began, so with this script alone the trigger's own response carries none
-- of the headers, and with scripts handling those hooks too (make run) it carries
-- all three.
--
-- Registering the same name again replaces the class (with an identical one here),
-- so a thread does it once; another thread seeing the trigger for the first time
-- does it again, harmlessly. Reloading this script keeps Events registered;
-- unloading it removes Events too, and so does host.unload("<script>#events")
-- alone (a thread that registered Events then registers it again only once the
-- script is reloaded).
--
--   hostscript serve --upstream http://127.0.0.1:9000 --script examples/event_system.lua
--   curl -H 'x-event-system: on' http://127.0.0.1:8080/    # then any request shows them
local EVENTS_VERSION = "events-1.0"

-- the headers Events sets, by hook: a table of plain data, copied with the class
local HEADERS = {
  send_request = "x-on_send_request",
  read_response = "x-on_read_response",
  send_response = "x-on_send_response",
}

local function stamp(headers, hook)
  headers[HEADERS[hook]] = EVENTS_VERSION
end

-- The class registered at run time: handlers for the hooks after read_request.
local Events = {}

function Events:on_send_request(txn)
  stamp(txn.req.headers, "send_request")
end

function Events:on_read_response(txn)
  stamp(txn.resp.headers, "read_response")
end

function Events:on_send_response(txn)
  stamp(txn.resp.headers, "send_response")
end

-- The class this script returns: watches for the trigger.
local EventSystem = {}

local registered = false -- per thread (each thread runs this chunk in its own state)

function EventSystem:on_read_request(txn)
  if not registered and txn.req.headers["x-event-system"] == "on" then
    -- checked and serialized now; published, for every thread, when this fire is
    -- over (and only if it ends without error)
    hs.register(Events, { name = "events" })
    registered = true
  end
end

return EventSystem
