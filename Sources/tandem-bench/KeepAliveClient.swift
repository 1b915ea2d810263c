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

    /// Sends one request and reads its answer. A failure (refused, reset, timed out,
    /// malformed) throws and drops that connection; the next call dials again. Never
    /// retries: a write sent twice could be applied twice.
    func call(_ method: String, _ url: String, token: String? = nil, json: Any? = nil,
              body: [UInt8]? = nil, headers: [(String, String)] = []) throws -> Answer {
        guard let u = URL(string: url), u.scheme == "http", let host = u.host, let port = u.port else {
            throw Failure("not an http://host:port URL: \(url)")
        }
        var path = u.path.isEmpty ? "/" : u.path
        if let q = u.query { path += "?" + q }
        var payload = body ?? []
        var fields = headers
        if let json {
            payload = [UInt8](try JSONSerialization.data(withJSONObject: json))
            fields.append(("Content-Type", "application/json"))
        }
        if let token { fields.append(("Authorization", "Bearer \(token)")) }
        let key = "\(host):\(port)"
        let connection: Connection
        if let c = connections[key] {
            connection = c
        } else {
            connection = try Connection(host: host, port: UInt16(port), timeoutSeconds: timeoutSeconds)
            connections[key] = connection
        }
        do {
            return try connection.exchange(method: method, path: path, host: key, headers: fields, body: payload)
        } catch {
            connection.close()
            connections[key] = nil
            throw error
        }
    }

    /// One TCP connection to one server.
    final class Connection {
        private var fd: Int32
        private var inbox: [UInt8] = []
        private var start = 0

        init(host: String, port: UInt16, timeoutSeconds: Int) throws {
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw Failure("socket: \(String(cString: strerror(errno)))") }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = port.bigEndian
            guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &addr.sin_addr) == 1 else {
                Glibc.close(fd)
                throw Failure("not an IPv4 address: \(host)")
            }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard rc == 0 else {
                let why = String(cString: strerror(errno))
                Glibc.close(fd)
                throw Failure("connect to \(host):\(port): \(why)")
            }
        }

        func close() {
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }

        func exchange(method: String, path: String, host: String, headers: [(String, String)], body: [UInt8]) throws -> Answer {
            guard fd >= 0 else { throw Failure("connection closed") }
            var head = "\(method) \(path) HTTP/1.1\r\nHost: \(host)\r\nContent-Length: \(body.count)\r\n"
            for (k, v) in headers { head += "\(k): \(v)\r\n" }
            head += "\r\n"
            var request = [UInt8](head.utf8)
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
            var chunk = [UInt8](repeating: 0, count: 64 << 10)
            while true {
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n < 0 && errno == EINTR { continue }
                if n == 0 { throw Failure("the server closed the connection") }
                guard n > 0 else { throw Failure("recv: \(String(cString: strerror(errno)))") }
                inbox.append(contentsOf: chunk[0..<n])
                return
            }
        }

        /// The index just past the next CRLF at or after `from`, reading more as needed.
        private func line(from: Int, limit: Int) throws -> Int {
            var i = from
            while true {
                while i + 1 < inbox.count {
                    if inbox[i] == 13 && inbox[i + 1] == 10 { return i + 2 }
                    i += 1
                }
                guard inbox.count - start <= limit else { throw Failure("response header longer than \(limit) bytes") }
                try fill()
            }
        }

        private func take(_ n: Int) throws -> [UInt8] {
            while inbox.count - start < n { try fill() }
            let out = Array(inbox[start..<(start + n)])
            start += n
            return out
        }

        private func readAnswer(head: Bool) throws -> Answer {
            // Indices into `inbox` stay valid while one answer is read; drop what earlier
            // answers consumed only here, between answers.
            if start > 0 {
                inbox.removeFirst(start)
                start = 0
            }
            // Status line and headers.
            var status = 0
            var length: Int?
            var chunked = false
            var close = false
            var first = true
            while true {
                let end = try line(from: start, limit: KeepAliveClient.maxHeaderBytes)
                let text = String(decoding: inbox[start..<(end - 2)], as: UTF8.self)
                start = end
                if text.isEmpty {
                    if status == 100 { first = true; status = 0; continue }  // interim answer
                    break
                }
                if first {
                    first = false
                    let parts = text.split(separator: " ", maxSplits: 2)
                    guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let code = Int(parts[1]) else {
                        throw Failure("not an HTTP/1.x status line: \(text.prefix(80))")
                    }
                    status = code
                    continue
                }
                guard let colon = text.firstIndex(of: ":") else { throw Failure("malformed header line: \(text.prefix(80))") }
                let name = text[..<colon].lowercased()
                let value = text[text.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                switch name {
                case "content-length":
                    guard let n = Int(value), n >= 0, n <= KeepAliveClient.maxBodyBytes else { throw Failure("bad Content-Length: \(value)") }
                    length = n
                case "transfer-encoding": chunked = value.lowercased().contains("chunked")
                case "connection": close = value.lowercased() == "close"
                default: break
                }
            }
            var body: [UInt8] = []
            if head || status == 204 || status == 304 {
                // No body.
            } else if chunked {
                while true {
                    let end = try line(from: start, limit: 1024)
                    let sizeText = String(decoding: inbox[start..<(end - 2)], as: UTF8.self).split(separator: ";").first ?? ""
                    start = end
                    guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16), size >= 0,
                          body.count + size <= KeepAliveClient.maxBodyBytes else { throw Failure("bad chunk size: \(sizeText)") }
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while true {
                            let e = try line(from: start, limit: KeepAliveClient.maxHeaderBytes)
                            let empty = e - start == 2
                            start = e
                            if empty { break }
                        }
                        break
                    }
                    body += try take(size)
                    _ = try take(2)
                }
            } else if let length {
                body = try take(length)
            } else {
                throw Failure("an answer without Content-Length or chunked encoding cannot be kept alive")
            }
            if close { self.close() }
            return Answer(status: status, body: body)
        }
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
