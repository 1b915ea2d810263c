import COpenSSL
import Foundation
import Glibc
import TandemCore
import TandemModel

/// The files of a site's TLS identity.
public struct TLSFiles: Hashable, Sendable {
    /// PEM certificate (chain) of this site, issued by the cluster's CA, naming the site id
    /// in its subject alternative name (DNS).
    public var certificate: String
    public var privateKey: String
    /// PEM certificate of the cluster's CA: the only issuer peers are accepted from.
    public var certificateAuthority: String
    /// TLS 1.2 is refused unless this is set (TLS 1.3 otherwise).
    public var allowTLS12: Bool

    public init(certificate: String, privateKey: String, certificateAuthority: String, allowTLS12: Bool = false) {
        self.certificate = certificate
        self.privateKey = privateKey
        self.certificateAuthority = certificateAuthority
        self.allowTLS12 = allowTLS12
    }
}

/// Why a connection was refused during the TLS or the application handshake. The raw
/// values name the metric label.
public enum HandshakeFailure: String, Sendable, CaseIterable {
    case plaintextPeer = "plaintext_peer"
    case noCertificate = "no_certificate"
    case unknownCertificateAuthority = "unknown_ca"
    case certificateExpired = "certificate_expired"
    case certificateNotYetValid = "certificate_not_yet_valid"
    case wrongSiteName = "wrong_site_name"
    case wrongCluster = "wrong_cluster"
    case unknownProtocolVersion = "unknown_protocol_version"
    case unknownSite = "unknown_site"
    case protocolVersionTooOld = "tls_version_refused"
    case timeout = "timeout"
    case closed = "closed"
    /// Not a failure: the peer dialed while this site was dialing it (or had just
    /// connected to it); the connection the lower site id dials is the one kept.
    case crossedDial = "crossed_dial"
    case other = "other"
}

/// A refused or failed connection, with the reason and OpenSSL's own words.
public struct TransportError: Error, CustomStringConvertible, Sendable {
    public let reason: HandshakeFailure
    public let detail: String
    public init(_ reason: HandshakeFailure, _ detail: String) {
        self.reason = reason
        self.detail = detail
    }
    public var description: String { "\(reason.rawValue): \(detail)" }
}

/// An OpenSSL context built from the site's files. Re-read by building a new one (on
/// SIGHUP): connections keep the context they started with.
///
/// Thread safety: an SSL_CTX is safe to share once configured; it is only read here.
public final class TLSContext: @unchecked Sendable {
    let handle: OpaquePointer
    /// The identity presented (nil only for test contexts without a certificate).
    public let files: TLSFiles?

    public convenience init(files: TLSFiles) throws(TransportError) {
        try self.init(certificateAuthority: files.certificateAuthority, identity: files, allowTLS12: files.allowTLS12)
    }

    init(certificateAuthority: String, identity: TLSFiles?, allowTLS12: Bool) throws(TransportError) {
        guard let ctx = SSL_CTX_new(TLS_method()) else { throw TransportError(.other, "SSL_CTX_new: \(openSSLErrors())") }
        handle = ctx
        files = identity
        let minimum = allowTLS12 ? tandem_tls1_2_version() : tandem_tls1_3_version()
        guard tandem_ssl_ctx_set_min_proto_version(ctx, minimum) == 1 else {
            throw TransportError(.other, "cannot set the minimum TLS version: \(openSSLErrors())")
        }
        SSL_CTX_set_options(ctx, tandem_ssl_op_no_compression() | tandem_ssl_op_no_renegotiation())
        if let files = identity {
            guard SSL_CTX_use_certificate_chain_file(ctx, files.certificate) == 1 else {
                throw TransportError(.other, "certificate \(files.certificate): \(openSSLErrors())")
            }
            guard SSL_CTX_use_PrivateKey_file(ctx, files.privateKey, SSL_FILETYPE_PEM) == 1 else {
                throw TransportError(.other, "private key \(files.privateKey): \(openSSLErrors())")
            }
            guard SSL_CTX_check_private_key(ctx) == 1 else {
                throw TransportError(.other, "private key \(files.privateKey) does not match certificate \(files.certificate)")
            }
        }
        guard SSL_CTX_load_verify_locations(ctx, certificateAuthority, nil) == 1 else {
            throw TransportError(.other, "CA certificate \(certificateAuthority): \(openSSLErrors())")
        }
        // Both sides present certificates from the cluster's CA.
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
    }

    deinit { SSL_CTX_free(handle) }
}

/// The SHA-256 of a certificate (DER), as hex.
func sha256Fingerprint(_ cert: OpaquePointer) -> String? {
    var md = [UInt8](repeating: 0, count: 32)
    var n: UInt32 = 0
    guard X509_digest(cert, EVP_sha256(), &md, &n) == 1 else { return nil }
    return md.prefix(Int(n)).map { String(format: "%02x", $0) }.joined()
}

/// Drains OpenSSL's error queue into one line.
func openSSLErrors() -> String {
    var parts: [String] = []
    while true {
        let e = ERR_get_error()
        if e == 0 { break }
        var buf = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(e, &buf, buf.count)
        parts.append(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }
    return parts.isEmpty ? "no OpenSSL error" : parts.joined(separator: "; ")
}

/// One TLS connection over a non-blocking socket. Used by one thread at a time: the
/// handshake by the connecting thread, then only by the connection's I/O thread.
final class TLSStream: @unchecked Sendable {
    let fd: Int32
    let ssl: OpaquePointer
    private var closed = false
    /// After a fatal error OpenSSL must not be asked to send a close_notify.
    private var fatal = false

    /// Wraps `fd` (taking ownership). `expectedPeer`: on a client, the site id the server's
    /// certificate must name.
    init(context: TLSContext, fd: Int32, isServer: Bool, expectedPeer: SiteID?) throws(TransportError) {
        guard let ssl = SSL_new(context.handle) else {
            Glibc.close(fd)
            throw TransportError(.other, "SSL_new: \(openSSLErrors())")
        }
        self.fd = fd
        self.ssl = ssl
        SSL_set_fd(ssl, fd)
        if isServer {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
            if let expectedPeer {
                // Without the host check any certificate of the cluster CA would pass as
                // the dialed site: refuse to go on if it cannot be set.
                guard SSL_set1_host(ssl, expectedPeer.name) == 1 else {
                    // Every stored property is set, so deinit runs on this throw and
                    // frees `ssl` and closes `fd`: freeing them here too would free twice.
                    fatal = true
                    throw TransportError(.other, "cannot set the expected site name \(expectedPeer): \(openSSLErrors())")
                }
                _ = tandem_ssl_set_tlsext_host_name(ssl, expectedPeer.name)
            }
        }
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }

    deinit { close() }

    /// Says this side will send nothing more: TLS close_notify, then the TCP FIN. The
    /// peer still reads what was sent, then the end; reads here go on.
    func finishWriting() {
        guard !closed, !fatal else { return }
        SSL_shutdown(ssl)
        shutdown(fd, Int32(SHUT_WR))
    }

    func close() {
        guard !closed else { return }
        closed = true
        if !fatal { SSL_shutdown(ssl) }
        SSL_free(ssl)
        Glibc.close(fd)
    }

    /// Runs the TLS handshake to completion or failure before `deadline` (monotonic ns).
    func handshake(deadline: UInt64) throws(TransportError) {
        while true {
            ERR_clear_error()
            let rc = SSL_do_handshake(ssl)
            if rc == 1 { return }
            let err = SSL_get_error(ssl, rc)
            switch err {
            case SSL_ERROR_WANT_READ: try wait(events: Int16(POLLIN), deadline: deadline)
            case SSL_ERROR_WANT_WRITE: try wait(events: Int16(POLLOUT), deadline: deadline)
            default: throw classify(err)
            }
        }
    }

    /// Why the handshake failed, from the verification result and OpenSSL's errors.
    func classify(_ err: Int32) -> TransportError {
        if err == SSL_ERROR_SSL || err == SSL_ERROR_SYSCALL { fatal = true }
        let verify = SSL_get_verify_result(ssl)
        let errors = openSSLErrors()
        let detail = "\(String(cString: X509_verify_cert_error_string(verify))); \(errors)"
        switch Int32(verify) {
        case X509_V_OK: break
        case X509_V_ERR_CERT_HAS_EXPIRED: return TransportError(.certificateExpired, detail)
        case X509_V_ERR_CERT_NOT_YET_VALID: return TransportError(.certificateNotYetValid, detail)
        case X509_V_ERR_HOSTNAME_MISMATCH: return TransportError(.wrongSiteName, detail)
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
             X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, X509_V_ERR_CERT_SIGNATURE_FAILURE, X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
            return TransportError(.unknownCertificateAuthority, detail)
        default: return TransportError(.other, detail)
        }
        let lower = errors.lowercased()
        if lower.contains("wrong version number") || lower.contains("http request") || lower.contains("packet length too long")
            || lower.contains("record layer failure") {
            return TransportError(.plaintextPeer, errors)
        }
        if lower.contains("peer did not return a certificate") || lower.contains("certificate required") {
            return TransportError(.noCertificate, errors)
        }
        if lower.contains("unknown ca") || lower.contains("certificate verify failed") || lower.contains("bad certificate") {
            // The other side refused our certificate or we refused theirs.
            return TransportError(.unknownCertificateAuthority, errors)
        }
        if lower.contains("certificate expired") { return TransportError(.certificateExpired, errors) }
        if lower.contains("unsupported protocol") || lower.contains("protocol version") {
            return TransportError(.protocolVersionTooOld, errors)
        }
        if err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN {
            return TransportError(.closed, "the peer closed the connection during the handshake (\(errors))")
        }
        return TransportError(.other, errors)
    }

    func wait(events: Int16, deadline: UInt64) throws(TransportError) {
        let now = monotonicNanoseconds()
        guard now < deadline else { throw TransportError(.timeout, "handshake did not complete in time") }
        var p = pollfd(fd: fd, events: events, revents: 0)
        let ms = Int32(min(1000, max(1, (deadline - now) / 1_000_000)))
        _ = poll(&p, 1, ms)
    }

    /// The SHA-256 of the peer's certificate (DER), as hex.
    func peerCertificateFingerprint() -> String? {
        guard let cert = SSL_get1_peer_certificate(ssl) else { return nil }
        defer { X509_free(cert) }
        return sha256Fingerprint(cert)
    }

    /// The peer certificate names `site` (subject alternative name).
    func peerCertificateNames(_ site: SiteID) -> Bool {
        guard let cert = SSL_get1_peer_certificate(ssl) else { return false }
        defer { X509_free(cert) }
        return X509_check_host(cert, site.name, site.name.utf8.count, 0, nil) == 1
    }

    enum IOResult {
        case done(Int)
        case wouldBlock(readable: Bool)
        case closed(String)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) -> IOResult {
        ERR_clear_error()
        let n = SSL_read(ssl, buffer.baseAddress, Int32(buffer.count))
        if n > 0 { return .done(Int(n)) }
        let err = SSL_get_error(ssl, n)
        switch err {
        case SSL_ERROR_WANT_READ: return .wouldBlock(readable: true)
        case SSL_ERROR_WANT_WRITE: return .wouldBlock(readable: false)
        case SSL_ERROR_ZERO_RETURN: return .closed("the peer closed the connection")
        default: return .closed(classify(err).description)
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer) -> IOResult {
        ERR_clear_error()
        let n = SSL_write(ssl, buffer.baseAddress, Int32(buffer.count))
        if n > 0 { return .done(Int(n)) }
        let err = SSL_get_error(ssl, n)
        switch err {
        case SSL_ERROR_WANT_READ: return .wouldBlock(readable: true)
        case SSL_ERROR_WANT_WRITE: return .wouldBlock(readable: false)
        default: return .closed(classify(err).description)
        }
    }

    /// Writes all of `bytes`, waiting for the socket when needed (handshake phase).
    func writeAll(_ bytes: [UInt8], deadline: UInt64) throws(TransportError) {
        var done = 0
        while done < bytes.count {
            let r = bytes.withUnsafeBytes { write(UnsafeRawBufferPointer(rebasing: $0[done...])) }
            switch r {
            case let .done(n): done += n
            case let .wouldBlock(readable): try wait(events: Int16(readable ? POLLIN : POLLOUT), deadline: deadline)
            case let .closed(why): throw TransportError(.closed, why)
            }
        }
    }

    /// Reads one frame (handshake phase).
    func readFrame(_ decoder: inout FrameDecoder, deadline: UInt64) throws(TransportError) -> (type: Wire.FrameType, body: [UInt8]) {
        while true {
            do {
                if let f = try decoder.next() { return f }
            } catch { throw TransportError(.other, "malformed frame: \(error)") }
            // Straight into the decoder's memory, as the connection's I/O loop reads.
            var r = IOResult.done(0)
            decoder.receive(atMost: 16 << 10) { room in
                r = read(into: room)
                if case let .done(n) = r { return n }
                return 0
            }
            switch r {
            case .done: break
            case let .wouldBlock(readable): try wait(events: Int16(readable ? POLLIN : POLLOUT), deadline: deadline)
            case let .closed(why):
                // TLS 1.3: a client learns here that the server refused its certificate.
                throw TransportError(why.hasPrefix("unknown_ca") ? .unknownCertificateAuthority : .closed, why)
            }
        }
    }
}

extension TLSContext {
    /// A new context from the same files, read again (certificate rotation, SIGHUP).
    public func reloaded() throws(TransportError) -> TLSContext {
        guard let files else { throw TransportError(.other, "a context without files cannot be reloaded") }
        return try TLSContext(files: files)
    }

    /// The SHA-256 of this context's certificate (DER), as hex: which files are in use.
    public var certificateFingerprint: String? {
        SSL_CTX_get0_certificate(handle).flatMap(sha256Fingerprint)
    }

    /// A context that presents no certificate (to test that peers refuse it).
    public static func withoutCertificate(certificateAuthority: String) throws(TransportError) -> TLSContext {
        try TLSContext(certificateAuthority: certificateAuthority, identity: nil, allowTLS12: false)
    }
}
