import COpenSSL
import Foundation
import Glibc
import TandemCore
import TandemModel

extension TLSContext {
    /// A server context for the HTTPS API: the site's certificate, TLS 1.2 or later (load
    /// balancers and HTTP clients may not speak 1.3 yet), no client certificate asked
    /// (clients authenticate with bearer tokens).
    public static func httpsServer(files: TLSFiles) throws(TransportError) -> TLSContext {
        let c = try TLSContext(certificateAuthority: files.certificateAuthority, identity: files, allowTLS12: true)
        SSL_CTX_set_verify(c.handle, SSL_VERIFY_NONE, nil)
        return c
    }
}

/// Terminates HTTPS for the site's HTTP API with the system's OpenSSL, in front of the
/// plain HTTP server bound to loopback: each connection gets a thread that completes the
/// TLS handshake (bounded in time) and then moves bytes both ways. At most
/// `maxConnections` at once, so a flood cannot exhaust threads.
public final class HTTPSTerminator: @unchecked Sendable {
    public let listen: PeerEndpoint
    public let backendPort: UInt16
    public let maxConnections: Int
    /// A connection with no bytes either way for this long is closed, so idle clients
    /// cannot hold every slot (health checks included).
    public var idleTimeoutNanoseconds: UInt64 = 60_000_000_000
    /// The name of each connection's thread (at most 15 bytes on Linux), as `top -H` and
    /// the tests that count a terminator's threads see it.
    public var connectionThreadName = "https-client"
    private let lock = NSLock()
    // Guarded by `lock`.
    private var context: TLSContext
    private var listenFD: Int32 = -1
    private var active = 0
    private var stopped = false
    private let log: @Sendable (String) -> Void
    /// Connections still in their TLS handshake, at most `maxHandshakes`; with all taken,
    /// a new one cuts the oldest, so clients that connect and send nothing cannot hold
    /// every slot for the handshake's 10 s each.
    private let handshakes: HandshakeSlots

    public init(listen: PeerEndpoint, backendPort: UInt16, context: TLSContext, maxConnections: Int = 512,
                maxHandshakes: Int = 64, log: @escaping @Sendable (String) -> Void = { _ in }) {
        handshakes = HandshakeSlots(limit: maxHandshakes)
        self.listen = listen
        self.backendPort = backendPort
        self.context = context
        self.maxConnections = maxConnections
        self.log = log
    }

    public func start() throws(TransportError) {
        signal(SIGPIPE, SIG_IGN)
        let fd = try Transport.listen(on: listen)
        lock.withLock { listenFD = fd }
        let t = Thread { [self] in
            nameCurrentThread("https-accept")
            acceptLoop(fd)
        }
        t.start()
    }

    /// New connections use new certificate files (SIGHUP); open ones stay.
    public func reload(context: TLSContext) { lock.withLock { self.context = context } }

    public func stop() {
        lock.withLock {
            stopped = true
            // Shut down only, under the lock: the acceptor wakes and closes it (a number
            // closed here could be reused before its next accept(2); see Transport.stop()).
            if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
            listenFD = -1
        }
    }

    private func acceptLoop(_ fd: Int32) {
        defer { Glibc.close(fd) }
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 {
                if lock.withLock({ stopped }) || errno == EBADF || errno == EINVAL { return }
                if errno != EINTR { usleep(20_000) }
                continue
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            let ctx: TLSContext? = lock.withLock {
                guard !stopped, active < maxConnections else { return nil }
                active += 1
                return context
            }
            guard let ctx else {
                Glibc.close(client)
                continue
            }
            let name = connectionThreadName
            let (serial, _) = handshakes.enter(client)
            let t = Thread { [self] in
                nameCurrentThread(name)
                defer {
                    handshakes.leave(serial)
                    lock.withLock { active -= 1 }
                }
                serve(client, ctx, handshake: serial)
            }
            t.start()
        }
    }

    private func serve(_ client: Int32, _ ctx: TLSContext, handshake: UInt64) {
        let tls: TLSStream
        do throws(TransportError) {
            tls = try TLSStream(context: ctx, fd: client, isServer: true, expectedPeer: nil)
            try tls.handshake(deadline: monotonicNanoseconds() + 10_000_000_000)
        } catch {
            if handshakes.wasCut(handshake) {
                log("event=https_handshake_cut reason=slots_full detail=\"the oldest of \(handshakes.limit) handshakes, cut for a newer connection\"")
            } else {
                log("event=https_handshake_failed reason=\(error.reason.rawValue) detail=\"\(error.detail)\"")
            }
            return
        }
        // A TLS client now: it can no longer be cut for a newer connection.
        handshakes.leave(handshake)
        defer { tls.close() }
        let backend: Int32
        do throws(TransportError) {
            backend = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: backendPort), timeoutNanoseconds: 2_000_000_000)
        } catch {
            log("event=https_backend_unreachable port=\(backendPort) detail=\"\(error.detail)\"")
            return
        }
        defer { Glibc.close(backend) }
        _ = fcntl(backend, F_SETFL, fcntl(backend, F_GETFL) | O_NONBLOCK)
        pump(tls, backend)
    }

    /// After the backend's last answer: the client is told the end (close_notify, FIN),
    /// then what it still sends is read and dropped until it closes, 4 MiB or 2 s. A close
    /// with the client's bytes unread would reset the connection, and a client still
    /// sending a refused upload could lose the answer (413) it has not read yet.
    private func finish(_ tls: TLSStream, buffer: inout [UInt8]) {
        tls.finishWriting()
        let deadline = monotonicNanoseconds() + 2_000_000_000
        var dropped = 0
        while dropped < 4 << 20, monotonicNanoseconds() < deadline {
            let r = buffer.withUnsafeMutableBytes { tls.read(into: $0) }
            switch r {
            case let .done(n): dropped += n
            case .wouldBlock:
                var p = pollfd(fd: tls.fd, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, 100)
            case .closed: return
            }
        }
    }

    /// Moves bytes between the TLS client and the plain backend until either side closes.
    /// Each direction holds at most one buffer: a slow reader slows its writer.
    private func pump(_ tls: TLSStream, _ backend: Int32) {
        let size = 64 << 10
        var up = [UInt8](repeating: 0, count: size), upLen = 0, upOff = 0  // client → backend
        var down = [UInt8](repeating: 0, count: size), downLen = 0, downOff = 0  // backend → client
        var clientOpen = true, backendOpen = true
        // What the last TLS read or write waits for, when it could not go on: a read may
        // need the socket writable, a write readable (TLS 1.3 post-handshake messages).
        var readWantsOutput = false, writeWantsInput = false
        var lastActivity = monotonicNanoseconds()
        var moved = 0, seen = 0  // bytes moved either way, and at the last look
        while clientOpen || upLen > upOff {
            let now = monotonicNanoseconds()
            if moved != seen {
                seen = moved
                lastActivity = now
            } else if now - lastActivity > idleTimeoutNanoseconds {
                return
            }
            // Client → buffer.
            if clientOpen && upLen == upOff {
                upLen = 0; upOff = 0
                let r = up.withUnsafeMutableBytes { tls.read(into: $0) }
                switch r {
                case let .done(n): upLen = n; moved += n; readWantsOutput = false
                case let .wouldBlock(readable): readWantsOutput = !readable
                case .closed: clientOpen = false
                }
            }
            // Buffer → backend.
            if upLen > upOff {
                let n = up.withUnsafeBytes { Glibc.write(backend, $0.baseAddress! + upOff, upLen - upOff) }
                if n > 0 { upOff += n } else if n < 0 && errno != EAGAIN && errno != EINTR { return }
            } else if !clientOpen && backendOpen {
                shutdown(backend, Int32(SHUT_WR))
            }
            // Backend → buffer.
            if backendOpen && downLen == downOff {
                downLen = 0; downOff = 0
                let n = down.withUnsafeMutableBytes { Glibc.read(backend, $0.baseAddress!, size) }
                if n > 0 { downLen = n; moved += n } else if n == 0 { backendOpen = false } else if errno != EAGAIN && errno != EINTR { backendOpen = false }
            }
            // Buffer → client.
            if downLen > downOff {
                let r = down.withUnsafeBytes { tls.write(UnsafeRawBufferPointer(rebasing: $0[downOff..<downLen])) }
                switch r {
                case let .done(n): downOff += n; writeWantsInput = false
                case let .wouldBlock(readable): writeWantsInput = readable
                case .closed: return
                }
            } else if !backendOpen {
                // The backend answered and closed: done, once the client has it all.
                if clientOpen { finish(tls, buffer: &up) }
                return
            }
            // Wait for whichever side can move. The client's side is waited on only for what
            // a blocked TLS call needs: reading, only while there is room for what it reads
            // (with the buffer full, as behind a backend that does not read, a client that
            // keeps sending would make poll return at once and this thread spin); writing,
            // only with bytes to write.
            let reading = clientOpen && upLen == upOff, writing = downLen > downOff
            let wantsInput = (reading && !readWantsOutput) || (writing && writeWantsInput)
            let wantsOutput = (reading && readWantsOutput) || (writing && !writeWantsInput)
            var fds = [pollfd(fd: tls.fd, events: (wantsInput ? Int16(POLLIN) : 0) | (wantsOutput ? Int16(POLLOUT) : 0), revents: 0),
                       pollfd(fd: backend, events: (backendOpen && downLen == downOff ? Int16(POLLIN) : 0) | (upLen > upOff ? Int16(POLLOUT) : 0),
                              revents: 0)]
            if SSL_pending(tls.ssl) > 0 && clientOpen && upLen == upOff { continue }
            _ = poll(&fds, 2, 1_000)
            if !clientOpen && upLen == upOff && !backendOpen { return }
        }
        // The client closed: let the backend's last answer out, while it moves (a client
        // that closed its side and never reads would otherwise hold this connection's
        // slot for good).
        lastActivity = monotonicNanoseconds()
        while downLen > downOff || backendOpen {
            guard monotonicNanoseconds() - lastActivity <= idleTimeoutNanoseconds else { return }
            if downLen == downOff {
                downLen = 0; downOff = 0
                var p = pollfd(fd: backend, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, 1_000)
                let n = down.withUnsafeMutableBytes { Glibc.read(backend, $0.baseAddress!, size) }
                if n > 0 { downLen = n; lastActivity = monotonicNanoseconds() } else if n == 0 || (errno != EAGAIN && errno != EINTR) { return }
                continue
            }
            let r = down.withUnsafeBytes { tls.write(UnsafeRawBufferPointer(rebasing: $0[downOff..<downLen])) }
            switch r {
            case let .done(n):
                downOff += n
                lastActivity = monotonicNanoseconds()
            case .wouldBlock:
                // Output only: the client's side is at its end, which poll reports as
                // readable at once.
                var p = pollfd(fd: tls.fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1_000)
            case .closed: return
            }
        }
    }
}

/// A minimal HTTPS client on the system's OpenSSL for the operator's CLI: one HTTP/1.1
/// request per connection, the server's certificate checked against the cluster CA and
/// required to name the site. (Foundation's URLSession on Linux cannot be given a CA.)
public enum HTTPSClient {
    /// The status and body of the answer.
    public static func request(host: String, port: UInt16, serverName: String, certificateAuthority: String, method: String,
                               path: String, headers: [(String, String)] = [], body: [UInt8] = [],
                               timeoutNanoseconds: UInt64 = 15_000_000_000, maxAnswerBytes: Int = 256 << 20) throws(TransportError) -> (status: Int, body: [UInt8]) {
        let deadline = monotonicNanoseconds() + timeoutNanoseconds
        let fd = try Transport.connect(to: PeerEndpoint(host: host, port: port), timeoutNanoseconds: timeoutNanoseconds)
        let tls = try TLSStream(context: try .withoutCertificate(certificateAuthority: certificateAuthority), fd: fd, isServer: false,
                                expectedPeer: SiteID(serverName))
        defer { tls.close() }
        try tls.handshake(deadline: deadline)
        var head = "\(method) \(path) HTTP/1.1\r\nHost: \(serverName)\r\nConnection: close\r\nContent-Length: \(body.count)\r\n"
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        try tls.writeAll(Array((head + "\r\n").utf8) + body, deadline: deadline)
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        reading: while true {
            let r = buffer.withUnsafeMutableBytes { tls.read(into: $0) }
            switch r {
            case let .done(n):
                answer.append(contentsOf: buffer[0..<n])
                guard answer.count <= maxAnswerBytes else { throw TransportError(.other, "the answer exceeds \(maxAnswerBytes) bytes") }
            case let .wouldBlock(readable):
                guard monotonicNanoseconds() < deadline else { throw TransportError(.timeout, "no complete answer in time") }
                try tls.wait(events: Int16(readable ? POLLIN : POLLOUT), deadline: deadline)
            case .closed:
                break reading
            }
        }
        return try parse(answer)
    }

    static func parse(_ answer: [UInt8]) throws(TransportError) -> (status: Int, body: [UInt8]) {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = (0...max(0, answer.count - 4)).first(where: { answer.count >= 4 && Array(answer[$0..<$0 + 4]) == separator }) else {
            throw TransportError(.other, "the answer has no HTTP header")
        }
        let headText = String(decoding: answer[0..<end], as: UTF8.self)
        let lines = headText.components(separatedBy: "\r\n")
        let parts = lines.first?.split(separator: " ") ?? []
        guard parts.count >= 2, let status = Int(parts[1]) else { throw TransportError(.other, "malformed status line: \(lines.first ?? "")") }
        var body = Array(answer[(end + 4)...])
        let fields = Dictionary(lines.dropFirst().compactMap { line -> (String, String)? in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (line[..<colon].lowercased(), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }, uniquingKeysWith: { a, _ in a })
        if fields["transfer-encoding"]?.lowercased() == "chunked" {
            var out: [UInt8] = []
            var i = 0
            while i < body.count {
                guard let lineEnd = (i..<max(i, body.count - 1)).first(where: { body[$0] == 13 && body[$0 + 1] == 10 }),
                      let size = Int(String(decoding: body[i..<lineEnd], as: UTF8.self).split(separator: ";").first ?? "", radix: 16)
                else { throw TransportError(.other, "malformed chunked body") }
                if size == 0 { break }
                let start = lineEnd + 2
                guard start + size <= body.count else { throw TransportError(.other, "truncated chunked body") }
                out.append(contentsOf: body[start..<start + size])
                i = start + size + 2
            }
            body = out
        } else if let length = fields["content-length"].flatMap({ Int($0) }), length <= body.count {
            body = Array(body[0..<length])
        }
        return (status, body)
    }
}
