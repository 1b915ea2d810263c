// A wrapper around SQLite's default page cache that skips truncations with nothing to
// drop. See pagecache.c for why.
#ifndef TANDEM_PAGECACHE_H
#define TANDEM_PAGECACHE_H

/// Installs the wrapper process-wide. Must run before SQLite initializes (before the
/// first connection opens); returns SQLite's result code (SQLITE_MISUSE afterwards).
int tandem_pagecache_install(void);

/// Truncations passed to SQLite's cache and truncations skipped, since installation
/// (for tests and benchmarks).
void tandem_pagecache_counts(unsigned long long *passed, unsigned long long *skipped);

/// Testing only: on this thread, the wrapper forgets the pages it fetched (a bookkeeping
/// bug that makes it skip truncations it must pass on), to show a test catches it.
void tandem_pagecache_set_testing_flaw(int on);

#endif
