// A wrapper around SQLite's default page cache that skips truncations with nothing to
// drop. See pagecache.c for why.
#ifndef TANDEM_PAGECACHE_H
#define TANDEM_PAGECACHE_H
// sqlite3.h is left to the CSQLite module (it needs macros defined before it).

/// Installs the wrapper process-wide. Must run before SQLite initializes (before the
/// first connection opens); returns SQLite's result code (SQLITE_MISUSE afterwards).
/// Installing twice is harmless.
int tandem_pagecache_install(void);

/// Truncations this thread's connections passed to SQLite's cache, skipped, and (in
/// check mode) skipped wrongly: the real truncation would have dropped pages.
void tandem_pagecache_thread_counts(unsigned long long *passed, unsigned long long *skipped,
                                    unsigned long long *wrong);

/// Testing only. Deliberate bookkeeping bugs, to show that tests catch one.
enum {
    TANDEM_PAGECACHE_FLAW_NONE = 0,
    /// Pages fetched are not recorded.
    TANDEM_PAGECACHE_FLAW_FETCHED = 1,
    /// Pages renumbered past the known maximum are not recorded.
    TANDEM_PAGECACHE_FLAW_RENUMBERED = 2,
};

/// Testing only, for this thread's connections: a deliberate flaw, and check mode (each
/// skipped truncation is run anyway and counted as wrong if it dropped a page).
void tandem_pagecache_set_testing(int flaw, int check);

/// Testing only: the installed wrapper's methods, a `const sqlite3_pcache_methods2 *`
/// (NULL when not installed), to drive one cache directly.
const void *tandem_pagecache_methods(void);

#endif
