#ifndef TANDEM_FILEIO_H
#define TANDEM_FILEIO_H

/// O_DIRECT, which Swift's Glibc module does not export (a _GNU_SOURCE macro whose value
/// differs between architectures).
int tandem_o_direct(void);
#endif
