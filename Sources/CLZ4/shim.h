// liblz4 (Debian: liblz4-dev). Block API only: Tandem frames its own chunks.
#include <lz4.h>
