// Why this exists: SQLite's B-tree, when it rebalances pages, swaps page numbers through
// a temporary number, the page that holds the lock byte (page 262145 with 4 KiB pages;
// btree.c, balance_nonroot). The default page cache (pcache1) remembers the largest page
// number it has seen, and at every commit SQLite asks it to drop the pages beyond the
// end of the database. While that remembered maximum is 262145 in a database smaller
// than 1 GiB, the drop walks every hash bucket and every cached page: a commit after a
// rebalance scanned the whole cache (64 MiB in the store): about 7% of a primary's loop
// at 64 clients (perf, tandem-bench cluster), and more as the cache fills.
//
// The wrapper keeps its own bound on the page numbers the cache can hold, exact enough to
// know when a truncation has nothing to drop, and passes every other call through.
//
// Invariant: every page in the inner cache has a number <= maxKey, or a number listed in
// `high` (pages renumbered above maxKey), or `overflow` is set. A truncation at iLimit
// is skipped only when maxKey < iLimit, no listed number is >= iLimit and no overflow:
// then no page can be dropped, and skipping it changes nothing SQLite can see (pcache1's
// own maximum is private to its truncation; the dirty-page and page-1 work happens in
// sqlite3PcacheTruncate before xTruncate is called).
//
// What remains: pcache1's own maximum stays high after a skip, so the next truncation
// that does have pages to drop (a rolled-back transaction that grew the file, VACUUM)
// still scans the whole cache once.
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include "pagecache.h"

enum { HIGH_SLOTS = 8 };

typedef struct WrappedCache {
    sqlite3_pcache *inner;
    unsigned maxKey;
    unsigned high[HIGH_SLOTS];
    int highCount;
    int overflow;
} WrappedCache;

static sqlite3_pcache_methods2 innerMethods;
static sqlite3_pcache_methods2 wrapper;
static int installed;

// Per thread, so that a test running its connections on one thread sees only its own
// truncations, and a deliberate flaw it turns on reaches no other test's connections.
static _Thread_local struct {
    unsigned long long passed, skipped, wrong;
    int flaw;   // TANDEM_PAGECACHE_FLAW_*: a deliberate bookkeeping bug
    int check;  // run each skipped truncation anyway and count the ones that dropped pages
} testing;

static int wrapInit(void *arg) { (void)arg; return innerMethods.xInit ? innerMethods.xInit(innerMethods.pArg) : SQLITE_OK; }
static void wrapShutdown(void *arg) { (void)arg; if (innerMethods.xShutdown) innerMethods.xShutdown(innerMethods.pArg); }

static sqlite3_pcache *wrapCreate(int szPage, int szExtra, int bPurgeable) {
    WrappedCache *w = sqlite3_malloc(sizeof(WrappedCache));
    if (!w) return 0;
    memset(w, 0, sizeof(*w));
    w->inner = innerMethods.xCreate(szPage, szExtra, bPurgeable);
    if (!w->inner) { sqlite3_free(w); return 0; }
    return (sqlite3_pcache *)w;
}

static void wrapCachesize(sqlite3_pcache *p, int nCachesize) {
    innerMethods.xCachesize(((WrappedCache *)p)->inner, nCachesize);
}

static int wrapPagecount(sqlite3_pcache *p) { return innerMethods.xPagecount(((WrappedCache *)p)->inner); }

static int isHigh(const WrappedCache *w, unsigned key) {
    for (int i = 0; i < w->highCount; i++) if (w->high[i] == key) return 1;
    return 0;
}

static sqlite3_pcache_page *wrapFetch(sqlite3_pcache *p, unsigned key, int createFlag) {
    WrappedCache *w = (WrappedCache *)p;
    sqlite3_pcache_page *page = innerMethods.xFetch(w->inner, key, createFlag);
    // A page found or made at `key` is covered by maxKey unless it is a renumbered one.
    if (page && key > w->maxKey && !isHigh(w, key) && testing.flaw != TANDEM_PAGECACHE_FLAW_FETCHED) w->maxKey = key;
    return page;
}

static void wrapUnpin(sqlite3_pcache *p, sqlite3_pcache_page *page, int discard) {
    // A discarded page leaves its number in `high` at worst: a later truncation is then
    // passed through (slower, never wrong).
    innerMethods.xUnpin(((WrappedCache *)p)->inner, page, discard);
}

static void wrapRekey(sqlite3_pcache *p, sqlite3_pcache_page *page, unsigned oldKey, unsigned newKey) {
    WrappedCache *w = (WrappedCache *)p;
    innerMethods.xRekey(w->inner, page, oldKey, newKey);
    for (int i = 0; i < w->highCount; i++) {
        if (w->high[i] == oldKey) { w->high[i] = w->high[--w->highCount]; break; }
    }
    if (newKey > w->maxKey && testing.flaw != TANDEM_PAGECACHE_FLAW_RENUMBERED) {
        if (w->highCount < HIGH_SLOTS) w->high[w->highCount++] = newKey;
        else w->overflow = 1;
    }
}

static void wrapTruncate(sqlite3_pcache *p, unsigned iLimit) {
    WrappedCache *w = (WrappedCache *)p;
    int mayDrop = w->overflow || w->maxKey >= iLimit;
    for (int i = 0; !mayDrop && i < w->highCount; i++) if (w->high[i] >= iLimit) mayDrop = 1;
    if (!mayDrop) {
        testing.skipped++;
        if (testing.check) {
            int before = innerMethods.xPagecount(w->inner);
            innerMethods.xTruncate(w->inner, iLimit);
            if (innerMethods.xPagecount(w->inner) != before) testing.wrong++;
        }
        return;
    }
    testing.passed++;
    innerMethods.xTruncate(w->inner, iLimit);
    // Every page left is below iLimit.
    unsigned bound = iLimit > 0 ? iLimit - 1 : 0;
    if (w->overflow) {
        w->maxKey = bound;
    } else {
        if (w->maxKey > bound) w->maxKey = bound;
        for (int i = 0; i < w->highCount; i++) if (w->high[i] < iLimit && w->high[i] > w->maxKey) w->maxKey = w->high[i];
    }
    w->highCount = 0;
    w->overflow = 0;
}

static void wrapDestroy(sqlite3_pcache *p) {
    WrappedCache *w = (WrappedCache *)p;
    innerMethods.xDestroy(w->inner);
    sqlite3_free(w);
}

static void wrapShrink(sqlite3_pcache *p) { innerMethods.xShrink(((WrappedCache *)p)->inner); }

int tandem_pagecache_install(void) {
    // A second GETPCACHE2 would return the wrapper itself, which would then wrap itself.
    if (installed) return SQLITE_OK;
    int rc = sqlite3_config(SQLITE_CONFIG_GETPCACHE2, &innerMethods);
    if (rc != SQLITE_OK) return rc;
    if (innerMethods.xCreate == 0 || innerMethods.xTruncate == 0) return SQLITE_ERROR;
    memset(&wrapper, 0, sizeof(wrapper));
    wrapper.iVersion = innerMethods.iVersion;
    wrapper.pArg = 0;
    wrapper.xInit = wrapInit;
    wrapper.xShutdown = wrapShutdown;
    wrapper.xCreate = wrapCreate;
    wrapper.xCachesize = wrapCachesize;
    wrapper.xPagecount = wrapPagecount;
    wrapper.xFetch = wrapFetch;
    wrapper.xUnpin = wrapUnpin;
    wrapper.xRekey = wrapRekey;
    wrapper.xTruncate = wrapTruncate;
    wrapper.xDestroy = wrapDestroy;
    wrapper.xShrink = innerMethods.xShrink ? wrapShrink : 0;
    rc = sqlite3_config(SQLITE_CONFIG_PCACHE2, &wrapper);
    if (rc == SQLITE_OK) installed = 1;
    return rc;
}

void tandem_pagecache_thread_counts(unsigned long long *passed, unsigned long long *skipped,
                                    unsigned long long *wrong) {
    if (passed) *passed = testing.passed;
    if (skipped) *skipped = testing.skipped;
    if (wrong) *wrong = testing.wrong;
}

void tandem_pagecache_set_testing(int flaw, int check) {
    testing.flaw = flaw;
    testing.check = check;
}

const void *tandem_pagecache_methods(void) { return installed ? &wrapper : 0; }
