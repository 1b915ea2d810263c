#define _GNU_SOURCE
#include <fcntl.h>
#include "fileio.h"

int tandem_o_direct(void) { return O_DIRECT; }
