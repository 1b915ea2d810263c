import Foundation
import Glibc
import TandemModel

/// The load generator's HTTP client: HTTP/1.1 over kept-alive TCP connections with
/// blocking I/O, one set of connections per client thread. Foundation's URLSession (libcurl
/// underneath, with its own threads and callbacks) used 60–70% of a core to drive 16–64
/// clients and limited what it measured; this client costs a few microseconds per request,
/// as pgbench does for PostgreSQL. For benchmarks on loopback only: no TLS, no redirects,
/// no proxies. Bounded: headers 64 KiB, bodies 256 MiB, 30 s per socket operation.
final class KeepAliveClient {
    struct Answer {
        var status: Int
        var body: [UInt8]
        var json: [String: Any] { ((try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]) ?? [:] }
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    static let maxHeaderBytes = 64 << 10
    static let maxBodyBytes = 256 << 20

    private var connections: [String: Connection] = [:]
    private let timeoutSeconds: Int

    init(timeoutSeconds: Int = 30) { self.timeoutSeconds = timeoutSeconds }

    deinit { for c in connections.values { c.close() } }

    /// Where a URL points: the connection's key, its address and the request target.
    struct Target: Equatable {
        var key: String
        var host: String
        var port: UInt16
        var path: String
    }

    /// Parses `http://host:port[/path][?query]` (the only form the benchmarks use) by hand:
    /// Foundation's URL parser was a tenth of the client's time when it ran per request.
    static func target(_ url: String) -> Target? {
        guard url.hasPrefix("http://") else { return nil }
        let rest = url.dropFirst(7)
        let authorityEnd = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        guard let colon = authority.lastIndex(of: ":"), let port = UInt16(authority[authority.index(after: colon)...]),
              colon > authority.startIndex else { return nil }
        var path = String(rest[authorityEnd...])
        if path.isEmpty || path.hasPrefix("?") { path = "/" + path }
        return Target(key: String(authority), host: String(authority[..<colon]), port: port, path: path)
    }

    private var lastURL = ""
    private var lastTarget: Target?

    /// Sends one request and reads its answer. A failure (refused, reset, timed out,
    /// malformed) throws and drops that connection; the next call dials again. Never
    /// retries: a write sent twice could be applied twice.
    func call(_ method: String, _ url: String, token: String? = nil, json: Any? = nil,
              body: [UInt8]? = nil, headers: [(String, String)] = []) throws -> Answer {
        let target: Target
        if url == lastURL, let t = lastTarget {
            target = t
        } else {
            guard let t = KeepAliveClient.target(url) else { throw Failure("not an http://host:port URL: \(url)") }
            lastURL = url
            lastTarget = t
            target = t
        }
        var payload = body ?? []
        var fields = headers
        if let json {
            payload = [UInt8](try JSONSerialization.data(withJSONObject: json))
            fields.append(("Content-Type", "application/json"))
        }
        if let token { fields.append(("Authorization", "Bearer \(token)")) }
        let connection: Connection
        if let c = connections[target.key] {
            connection = c
        } else {
            connection = try Connection(host: target.host, port: target.port, timeoutSeconds: timeoutSeconds)
            connections[target.key] = connection
        }
        do {
            return try connection.exchange(method: method, path: target.path, host: target.key, headers: fields, body: payload)
        } catch {
            connection.close()
            connections[target.key] = nil
            throw error
        }
    }

    /// One TCP connection to one server.
    final class Connection {
        private var fd: Int32
        /// Bytes read and not yet consumed start at `start`.
        private var inbox: [UInt8] = []
        private var start = 0
        /// The buffer `recv` reads into, allocated once (a fresh zeroed 64 KiB array per
        /// read was the client's largest single cost).
        private let chunk: UnsafeMutableRawBufferPointer
        private var parser = ResponseParser(maxHeaderBytes: KeepAliveClient.maxHeaderBytes, maxBodyBytes: KeepAliveClient.maxBodyBytes)

        init(host: String, port: UInt16, timeoutSeconds: Int) throws {
            let sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard sock >= 0 else {
                throw Failure("socket: \(String(cString: strerror(errno)))")
            }
            var one: Int32 = 1
            setsockopt(sock, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
            setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = port.bigEndian
            guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &addr.sin_addr) == 1 else {
                Glibc.close(sock)
                throw Failure("not an IPv4 address: \(host)")
            }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(sock, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard rc == 0 else {
                let why = String(cString: strerror(errno))
                Glibc.close(sock)
                throw Failure("connect to \(host):\(port): \(why)")
            }
            fd = sock
            // Only now: a failed dial above has nothing to free.
            chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
        }

        deinit {
            close()
            chunk.deallocate()
        }

        func close() {
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }

        func exchange(method: String, path: String, host: String, headers: [(String, String)], body: [UInt8]) throws -> Answer {
            guard fd >= 0 else { throw Failure("connection closed") }
            var request: [UInt8] = []
            request.reserveCapacity(128 + path.utf8.count + headers.reduce(0) { $0 + $1.0.utf8.count + $1.1.utf8.count + 4 }
                                    + (body.count <= 64 << 10 ? body.count : 0))
            func put(_ s: String) { request.append(contentsOf: s.utf8) }
            put(method); put(" "); put(path); put(" HTTP/1.1\r\nHost: "); put(host)
            put("\r\nContent-Length: "); put(String(body.count)); put("\r\n")
            for (k, v) in headers { put(k); put(": "); put(v); put("\r\n") }
            put("\r\n")
            if body.count <= 64 << 10 {
                request += body  // one write: head and a small body in one segment
                try send(request)
            } else {
                try send(request)
                try send(body)
            }
            return try readAnswer(head: method == "HEAD")
        }

        private func send(_ bytes: [UInt8]) throws {
            var off = 0
            while off < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw Failure("send: \(String(cString: strerror(errno)))") }
                off += n
            }
        }

        /// Reads more bytes into `inbox`; throws when the server closed or the read timed out.
        private func fill() throws {
            while true {
                let n = recv(fd, chunk.baseAddress, chunk.count, 0)
                if n < 0 && errno == EINTR { continue }
                if n == 0 { throw Failure("the server closed the connection") }
                guard n > 0 else { throw Failure("recv: \(String(cString: strerror(errno)))") }
                inbox.append(contentsOf: UnsafeRawBufferPointer(rebasing: chunk[0..<n]))
                return
            }
        }

        private func readAnswer(head: Bool) throws -> Answer {
            // Drop what earlier answers consumed, between answers only.
            if start == inbox.count {
                inbox.removeAll(keepingCapacity: true)
                start = 0
            } else if start > 0 {
                inbox.removeFirst(start)
                start = 0
            }
            parser.begin(bodyless: head)
            while true {
                let step = try inbox.withUnsafeBufferPointer { try parser.consume($0, from: start) }
                start = step.next
                if let answer = step.answer {
                    if answer.close { close() }
                    return Answer(status: answer.status, body: answer.body)
                }
                try fill()
            }
        }
    }
}

/// An HTTP/1.1 response parser over bytes, for the load generator: status line, the
/// headers it needs (Content-Length, Transfer-Encoding, Connection) matched without making
/// strings, then a body by length or in chunks. Fed the connection's buffer again after
/// each read; it keeps its place between calls. Bounded by `maxHeaderBytes` per header
/// block (and per chunk-size line) and `maxBodyBytes`.
struct ResponseParser {
    struct Parsed: Equatable {
        var status: Int
        var body: [UInt8]
        var close: Bool
    }

    struct Step {
        /// Where the caller's buffer is consumed up to.
        var next: Int
        var answer: Parsed?
    }

    private enum State {
        case statusLine, headers, lengthBody(Int), chunkSize, chunkData(Int), chunkEnd, trailers, done
    }

    let maxHeaderBytes: Int
    let maxBodyBytes: Int
    private var state = State.statusLine
    private var bodyless = false
    private var status = 0
    private var length: Int?
    private var chunked = false
    private var close = false
    private var body: [UInt8] = []
    /// Bytes of the current header block (or chunk-size line) read so far.
    private var headerBytes = 0

    init(maxHeaderBytes: Int, maxBodyBytes: Int) {
        self.maxHeaderBytes = maxHeaderBytes
        self.maxBodyBytes = maxBodyBytes
    }

    /// Starts a new answer; `bodyless` for the answer to a HEAD request.
    mutating func begin(bodyless: Bool) {
        self = ResponseParser(maxHeaderBytes: maxHeaderBytes, maxBodyBytes: maxBodyBytes)
        self.bodyless = bodyless
    }

    /// Consumes what it can of `buf` from `from`; returns where it stopped and, once the
    /// answer is whole, the answer. Throws on a malformed or oversized answer.
    mutating func consume(_ buf: UnsafeBufferPointer<UInt8>, from: Int) throws -> Step {
        var i = from
        while true {
            switch state {
            case .done:
                return Step(next: i, answer: Parsed(status: status, body: body, close: close))
            case .lengthBody(let remaining), .chunkData(let remaining):
                let n = min(remaining, buf.count - i)
                body.append(contentsOf: UnsafeBufferPointer(rebasing: buf[i..<(i + n)]))
                i += n
                let chunk: Bool
                if case .chunkData = state { chunk = true } else { chunk = false }
                if n < remaining {
                    state = chunk ? .chunkData(remaining - n) : .lengthBody(remaining - n)
                    return Step(next: i, answer: nil)
                }
                state = chunk ? .chunkEnd : .done
            case .statusLine, .headers, .chunkSize, .chunkEnd, .trailers:
                guard let end = Self.lineEnd(buf, from: i) else {
                    var limit = maxHeaderBytes
                    if case .chunkSize = state { limit = 1024 }
                    guard headerBytes + (buf.count - i) <= limit else {
                        throw KeepAliveClient.Failure("response header longer than \(limit) bytes")
                    }
                    return Step(next: i, answer: nil)
                }
                let line = UnsafeBufferPointer(rebasing: buf[i..<end])
                headerBytes += end + 2 - i
                i = end + 2
                try take(line)
            }
        }
    }

    /// The index of the CR of the next CRLF at or after `from`, if there is one.
    private static func lineEnd(_ buf: UnsafeBufferPointer<UInt8>, from: Int) -> Int? {
        var j = from
        while j + 1 < buf.count {
            if buf[j] == 13 && buf[j + 1] == 10 { return j }
            j += 1
        }
        return nil
    }

    private mutating func take(_ line: UnsafeBufferPointer<UInt8>) throws {
        switch state {
        case .statusLine:
            // "HTTP/1.x NNN reason"
            guard line.count >= 12, Self.starts(line, with: "HTTP/1."), line[8] == 32,
                  let code = Self.decimal(UnsafeBufferPointer(rebasing: line[9..<12])), line.count == 12 || line[12] == 32 else {
                throw KeepAliveClient.Failure("not an HTTP/1.x status line: \(String(decoding: line.prefix(80), as: UTF8.self))")
            }
            status = code
            state = .headers
        case .headers:
            if line.isEmpty {
                headerBytes = 0
                if status >= 100 && status < 200 && status != 101 { state = .statusLine; return }  // interim answer
                if bodyless || status == 204 || status == 304 || status == 101 {
                    state = .done
                } else if chunked {
                    state = .chunkSize
                } else if let length {
                    guard length <= maxBodyBytes else { throw KeepAliveClient.Failure("bad Content-Length: \(length)") }
                    body.reserveCapacity(length)
                    state = length == 0 ? .done : .lengthBody(length)
                } else {
                    throw KeepAliveClient.Failure("an answer without Content-Length or chunked encoding cannot be kept alive")
                }
                return
            }
            guard let colon = line.firstIndex(of: 58) else {
                throw KeepAliveClient.Failure("malformed header line: \(String(decoding: line.prefix(80), as: UTF8.self))")
            }
            let name = UnsafeBufferPointer(rebasing: line[..<colon])
            let value = Self.trimmed(UnsafeBufferPointer(rebasing: line[(colon + 1)...]))
            if Self.equalsIgnoringCase(name, "content-length") {
                guard let n = Self.decimal(value), n <= maxBodyBytes else {
                    throw KeepAliveClient.Failure("bad Content-Length: \(String(decoding: value.prefix(40), as: UTF8.self))")
                }
                length = n
            } else if Self.equalsIgnoringCase(name, "transfer-encoding") {
                chunked = Self.containsIgnoringCase(value, "chunked")
            } else if Self.equalsIgnoringCase(name, "connection") {
                close = Self.equalsIgnoringCase(value, "close")
            }
        case .chunkSize:
            headerBytes = 0
            var digits = line
            if let semicolon = line.firstIndex(of: 59) { digits = UnsafeBufferPointer(rebasing: line[..<semicolon]) }
            guard let size = Self.hexadecimal(Self.trimmed(digits)), body.count + size <= maxBodyBytes else {
                throw KeepAliveClient.Failure("bad chunk size: \(String(decoding: line.prefix(40), as: UTF8.self))")
            }
            state = size == 0 ? .trailers : .chunkData(size)
        case .chunkEnd:
            guard line.isEmpty else { throw KeepAliveClient.Failure("chunk not followed by CRLF") }
            headerBytes = 0
            state = .chunkSize
        case .trailers:
            if line.isEmpty { state = .done }
        case .lengthBody, .chunkData, .done:
            break
        }
    }

    private static func starts(_ b: UnsafeBufferPointer<UInt8>, with s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard b.count >= n else { return false }
        let p = s.utf8Start
        for k in 0..<n where b[k] != p[k] { return false }
        return true
    }

    /// ASCII case-insensitive equality with a lowercase literal.
    private static func equalsIgnoringCase(_ b: UnsafeBufferPointer<UInt8>, _ s: StaticString) -> Bool {
        guard b.count == s.utf8CodeUnitCount else { return false }
        let p = s.utf8Start
        for k in 0..<b.count where lower(b[k]) != p[k] { return false }
        return true
    }

    private static func containsIgnoringCase(_ b: UnsafeBufferPointer<UInt8>, _ s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard b.count >= n else { return false }
        let p = s.utf8Start
        outer: for from in 0...(b.count - n) {
            for k in 0..<n where lower(b[from + k]) != p[k] { continue outer }
            return true
        }
        return false
    }

    private static func lower(_ c: UInt8) -> UInt8 { c >= 65 && c <= 90 ? c | 0x20 : c }

    private static func trimmed(_ b: UnsafeBufferPointer<UInt8>) -> UnsafeBufferPointer<UInt8> {
        var lo = 0, hi = b.count
        while lo < hi && (b[lo] == 32 || b[lo] == 9) { lo += 1 }
        while hi > lo && (b[hi - 1] == 32 || b[hi - 1] == 9) { hi -= 1 }
        return UnsafeBufferPointer(rebasing: b[lo..<hi])
    }

    /// A non-negative decimal of at most 18 digits (no sign, no overflow).
    private static func decimal(_ b: UnsafeBufferPointer<UInt8>) -> Int? {
        guard !b.isEmpty, b.count <= 18 else { return nil }
        var v = 0
        for c in b {
            guard c >= 48 && c <= 57 else { return nil }
            v = v * 10 + Int(c - 48)
        }
        return v
    }

    /// A hexadecimal of at most 15 digits.
    private static func hexadecimal(_ b: UnsafeBufferPointer<UInt8>) -> Int? {
        guard !b.isEmpty, b.count <= 15 else { return nil }
        var v = 0
        for c in b {
            let d: Int
            switch c {
            case 48...57: d = Int(c - 48)
            case 65...70: d = Int(c - 55)
            case 97...102: d = Int(c - 87)
            default: return nil
            }
            v = v * 16 + d
        }
        return v
    }
}

/// Runs `clients` threads, each looping `op` (with its own client) until `seconds` pass
/// or `stopWhen` holds, while `sample` runs every 200 ms on the caller. Returns
/// (successes, failures, wall seconds, this process's CPU share of one core: the load
/// generator's cost). Failures are reported, not hidden: they take time from a figure.
func driveThreads(clients: Int, seconds: Double, op: @escaping @Sendable (Int, KeepAliveClient) -> Bool,
                  sample: () -> Void = {}, stopWhen: @escaping @Sendable () -> Bool = { false }) async -> (Int, Int, Double, Double) {
    let done = Counter()
    let failed = Counter()
    let finished = Counter()
    let cpu0 = processCPUSeconds()
    let t0 = monotonicNanoseconds()
    let end = t0 + UInt64(seconds * 1e9)
    for i in 0..<clients {
        let t = Thread {
            let client = KeepAliveClient()
            var k = i
            while monotonicNanoseconds() < end && !stopWhen() {
                if op(k, client) { _ = done.next() } else { _ = failed.next() }
                k += clients
            }
            _ = finished.next()
        }
        t.stackSize = 1 << 20
        t.start()
    }
    while finished.value < clients {
        sample()
        try? await Task.sleep(nanoseconds: 200_000_000)
    }
    let wall = Double(monotonicNanoseconds() - t0) / 1e9
    return (done.value, failed.value, wall, (processCPUSeconds() - cpu0) / wall)
}

/// One client's sequential latencies of `op` (seconds, sorted), on a thread of its own.
func latencies(_ n: Int, timeoutSeconds: Int = 30, _ op: @escaping @Sendable (KeepAliveClient, Int) -> Bool) async -> [Double] {
    await onThread {
        let client = KeepAliveClient(timeoutSeconds: timeoutSeconds)
        var lat: [Double] = []
        for i in 0..<n {
            let t = monotonicNanoseconds()
            if op(client, i) { lat.append(Double(monotonicNanoseconds() - t) / 1e9) }
        }
        return lat.sorted()
    }
}

/// Runs a blocking body on its own thread (so blocking I/O never holds a thread of
/// Swift's small cooperative pool).
func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in
        let t = Thread { c.resume(returning: body()) }
        t.start()
    }
}
