/* hostscript bench --ats, `python benchmarks/ats.py --decompose`: Traffic Server's own
 * cost of the plugin's hooks — a global plugin that adds READ_REQUEST_HDR,
 * SEND_REQUEST_HDR and SEND_RESPONSE_HDR (and TXN_CLOSE with the argument "close")
 * and re-enables at once, doing nothing. Built by ats.py with cc against
 * trafficserver-dev's headers. */
#include <string.h>

#include <ts/ts.h>

static int on_hook(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    (void)event;
    TSHttpTxnReenable((TSHttpTxn)edata, TS_EVENT_HTTP_CONTINUE);
    return 0;
}

void TSPluginInit(int argc, const char *argv[]) {
    TSPluginRegistrationInfo info = {"noop_hooks", "hostscript", "hostscript@localhost"};
    if (TSPluginRegister(&info) != TS_SUCCESS) return;
    TSCont contp = TSContCreate(on_hook, NULL);
    TSHttpHookAdd(TS_HTTP_READ_REQUEST_HDR_HOOK, contp);
    TSHttpHookAdd(TS_HTTP_SEND_REQUEST_HDR_HOOK, contp);
    TSHttpHookAdd(TS_HTTP_SEND_RESPONSE_HDR_HOOK, contp);
    if (argc > 1 && !strcmp(argv[1], "close")) TSHttpHookAdd(TS_HTTP_TXN_CLOSE_HOOK, contp);
}
