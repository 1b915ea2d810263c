// libssl and libcrypto from OpenSSL 3 (Debian: libssl-dev).
#ifndef TANDEM_COPENSSL_SHIM_H
#define TANDEM_COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

// Macro-only calls do not import into Swift: wrap them.
static inline int tandem_ssl_ctx_set_min_proto_version(SSL_CTX *ctx, int version) {
    return (int)SSL_CTX_set_min_proto_version(ctx, version);
}
static inline int tandem_ssl_ctx_set_max_proto_version(SSL_CTX *ctx, int version) {
    return (int)SSL_CTX_set_max_proto_version(ctx, version);
}
static inline long tandem_ssl_ctx_set_mode(SSL_CTX *ctx, long mode) {
    return SSL_CTX_set_mode(ctx, mode);
}
static inline int tandem_ssl_set_tlsext_host_name(SSL *ssl, const char *name) {
    return (int)SSL_set_tlsext_host_name(ssl, name);
}
static inline uint64_t tandem_ssl_op_no_compression(void) { return SSL_OP_NO_COMPRESSION; }
static inline uint64_t tandem_ssl_op_no_renegotiation(void) { return SSL_OP_NO_RENEGOTIATION; }
static inline long tandem_ssl_mode_auto_retry(void) { return SSL_MODE_AUTO_RETRY; }
static inline int tandem_tls1_2_version(void) { return TLS1_2_VERSION; }
static inline int tandem_tls1_3_version(void) { return TLS1_3_VERSION; }
#endif
