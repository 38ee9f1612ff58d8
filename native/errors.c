/*
 * errors.c — hs_error, filled from the host's own checks or from a failed Lua call.
 *
 * Turning a Lua error into an hs_error runs outside protected mode (the error was
 * already caught), so nothing here may raise: the error value is only read, never
 * converted in place (lua_tostring on a number would allocate), and a message the
 * handler could not produce is described by its type. (After a memory error a full
 * collection frees what the failed handler left: collecting does not raise.)
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

void hs_error_set(hs_error *e, int kind, const char *script, const char *hook, const char *fmt, ...) {
    e->kind = kind;
    e->line = 0;
    snprintf(e->script, sizeof e->script, "%s", script ? script : "");
    snprintf(e->hook, sizeof e->hook, "%s", hook ? hook : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    e->traceback[0] = 0;
}

/* The line of "chunk:LINE: message" — Lua may shorten a long chunk name to
 * "...tail", so look for the first ":digits:" rather than for the name. */
static int line_of(const char *msg) {
    for (const char *p = strchr(msg, ':'); p; p = strchr(p + 1, ':')) {
        const char *d = p + 1;
        while (*d >= '0' && *d <= '9') d++;
        if (d > p + 1 && *d == ':') return atoi(p + 1);
    }
    return 0;
}

/* Lua shortens a long chunk name to "...tail"; put the whole script name back in
 * front of "...tail:LINE: message" so the operator sees which file it was. */
static void expand_chunkname(char *msg, size_t cap, const char *script) {
    if (strncmp(msg, "...", 3) != 0) return;
    const char *colon = strchr(msg + 3, ':');
    while (colon && !(colon[1] >= '0' && colon[1] <= '9')) colon = strchr(colon + 1, ':');
    if (!colon) return;
    size_t tail = (size_t)(colon - (msg + 3)), slen = strlen(script);
    if (tail > slen || strncmp(script + slen - tail, msg + 3, tail) != 0) return;
    char out[1024];
    snprintf(out, sizeof out, "%s%s", script, colon);
    snprintf(msg, cap, "%s", out);
}

/* Fill E from a failed lua_pcall (rc) whose error value is on top. HANDLED: the call
 * ran with the message handler (lapi_hs.c), which stored message and traceback in
 * S->err; otherwise S->err is not looked at (it may hold another call's error). */
void hs_error_from_lua(hs_state *S, hs_error *e, int rc, const char *script, int handled) {
    lua_State *L = S->L;
    int kind = HS_ERR_RUNTIME;
    char msg[sizeof e->message];
    const char *sep = *script ? ": " : "";
    if (rc == LUA_ERRMEM || S->mem_refused || S->abort == HS_ERR_MEMORY) {
        kind = HS_ERR_MEMORY;
        snprintf(msg, sizeof msg, "%s%smemory limit exceeded (%zu bytes per state)", script, sep,
                 S->heap_limit);
    } else if (S->abort == HS_ERR_TIMEOUT) {
        kind = HS_ERR_TIMEOUT;
        snprintf(msg, sizeof msg, "%s%stime limit exceeded (%g s)", script, sep, S->host->time_limit);
    } else if (handled && S->err.message[0]) {
        snprintf(msg, sizeof msg, "%s", S->err.message);
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        snprintf(msg, sizeof msg, "%s", lua_tostring(L, -1));
    } else if (lua_type(L, -1) == LUA_TNUMBER) { /* lua_tostring would convert it: allocate */
        snprintf(msg, sizeof msg, "%.14g", (double)lua_tonumber(L, -1));
    } else {
        snprintf(msg, sizeof msg, "(error object is a %s value)", luaL_typename(L, -1));
    }
    expand_chunkname(msg, sizeof msg, script);
    char tb[sizeof e->traceback];
    snprintf(tb, sizeof tb, "%s", handled ? S->err.traceback : "");
    e->kind = kind;
    snprintf(e->script, sizeof e->script, "%s", script);
    memcpy(e->message, msg, sizeof msg);
    memcpy(e->traceback, tb, sizeof tb);
    e->line = line_of(e->message);
    if (kind == HS_ERR_MEMORY) lua_gc(L, LUA_GCCOLLECT, 0); /* give the next fire its memory back */
}

