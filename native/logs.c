/*
 * logs.c — the log records of a fire: hs.log, print and the core's own notes
 * (dropped records, registrations) append here; the host reads them with hs_logs
 * after the fire. Records are packed as hostscript.h describes; a fire keeps at
 * most HS_LOGS_MAX bytes and counts what it drops, said once at its end.
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

static void put_log(hs_state *S, int level, const char *script, const char *msg, size_t len) {
    size_t slen = strlen(script);
    if (slen > UINT16_MAX) slen = UINT16_MAX;
    uint8_t lv = (uint8_t)level;
    uint16_t sl = (uint16_t)slen;
    uint32_t ml = (uint32_t)len;
    hs_buf_put(&S->logs, &lv, 1);
    hs_buf_put(&S->logs, &sl, 2);
    hs_buf_put(&S->logs, script, slen);
    hs_buf_put(&S->logs, &ml, 4);
    hs_buf_put(&S->logs, msg, len);
}

void hs_log_put(hs_state *S, int level, const char *script, const char *msg, size_t len) {
    if (S->logs.len + len + strlen(script) + 7 > HS_LOGS_MAX) {
        S->logs_dropped++; /* counted, and said once at the end of the fire */
        return;
    }
    put_log(S, level, script, msg, len);
}

void hs_log_dropped(hs_state *S) {
    char msg[160];
    int n = snprintf(msg, sizeof msg, "%d log messages dropped: over %d KiB of logs in one call",
                     S->logs_dropped, HS_LOGS_MAX >> 10);
    put_log(S, 30, "", msg, (size_t)n);
    S->logs_dropped = 0;
}
