// libsqlite3 (Debian: libsqlite3-dev). Debian builds the library with the session
// extension and the pre-update hook; sqlite3.h hides their declarations unless these
// are defined before the include.
#ifndef TANDEM_CSQLITE_SHIM_H
#define TANDEM_CSQLITE_SHIM_H
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>

// SQLITE_TRANSIENT is a cast macro that does not import into Swift.
static inline sqlite3_destructor_type tandem_sqlite_transient(void) {
    return SQLITE_TRANSIENT;
}
// sqlite3_db_config is variadic, which Swift cannot call. Turns triggers on or off for
// statements prepared afterwards; returns SQLite's result code.
static inline int tandem_sqlite_enable_triggers(sqlite3 *db, int on) {
    int now = 0;
    return sqlite3_db_config(db, SQLITE_DBCONFIG_ENABLE_TRIGGER, on, &now);
}
#endif
