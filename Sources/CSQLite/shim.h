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
#endif
