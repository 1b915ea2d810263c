import Foundation
import Glibc

/// A TCP proxy between two sites, for partition drills where network namespaces are not
/// available: traffic flows while it is open; `cut()` closes every connection through it
/// and refuses new ones until `heal()`; `hold()` is a silent partition: connections stay
/// open (and new ones are accepted) but no byte passes until `heal()`, as when a link
/// drops packets without a reset. One thread per direction per connection.
public final class TCPProxy: @unchecked Sendable {
    public let listenPort: UInt16
    public let targetPort: UInt16
    private let lock = NSLock()
    // Guarded by `lock`.
    private var isCut = false
    private var isHeld = false
    private var stopped = false
    private var delayMicroseconds: UInt32 = 0
    /// Bytes per second each direction carries at most (0: as fast as it can).
    private var bytesPerSecond = 0
    private var open: [Int32] = []
    private let listenFD: Int32

    public init(listenPort: UInt16, targetPort: UInt16) throws {
        self.listenPort = listenPort
        self.targetPort = targetPort
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw DrillError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withLoopback(port: listenPort) { bind(fd, $0, $1) }
        guard rc == 0, listen(fd, 64) == 0 else {
            Glibc.close(fd)
            throw DrillError("proxy cannot listen on 127.0.0.1:\(listenPort): \(String(cString: strerror(errno)))")
        }
        listenFD = fd
        let t = Thread { [self] in acceptLoop() }
        t.name = "drill-proxy-\(listenPort)"
        t.start()
    }

    /// Drops every connection through the proxy and refuses new ones.
    public func cut() {
        // Under the lock: a descriptor in `open` is not closed yet (closing removes it first).
        lock.withLock {
            isCut = true
            for fd in open { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Stops every byte in both directions without closing anything (a silent partition).
    public func hold() { lock.withLock { isHeld = true } }

    /// Heals a cut or a hold and removes any delay: held bytes flow on.
    public func heal() {
        lock.withLock {
            isCut = false
            isHeld = false
            delayMicroseconds = 0
            bytesPerSecond = 0
        }
    }

    /// Carries at most `bytesPerSecond` in each direction, in pieces of a fiftieth of a
    /// second (a link degraded to a trickle, not cut); 0 lifts the limit.
    public func throttle(bytesPerSecond: Int) { lock.withLock { self.bytesPerSecond = max(0, bytesPerSecond) } }

    /// Holds every chunk for `milliseconds` before passing it on (a slow, distant link).
    public func delay(milliseconds: Int) { lock.withLock { delayMicroseconds = UInt32(max(0, milliseconds) * 1000) } }

    public func stop() {
        cut()
        lock.withLock { stopped = true }
        shutdown(listenFD, Int32(SHUT_RDWR))
        Glibc.close(listenFD)
    }

    private func acceptLoop() {
        while true {
            let client = accept(listenFD, nil, nil)
            if client < 0 {
                if lock.withLock({ stopped }) || errno == EBADF || errno == EINVAL { return }
                continue
            }
            let refused = lock.withLock { isCut || stopped }
            if refused {
                Glibc.close(client)
                continue
            }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            let rc = withLoopback(port: targetPort) { connect(server, $0, $1) }
            // Registered under the lock that `cut` takes: a connection made across a cut
            // is dropped here rather than surviving it.
            let admitted = rc == 0 && lock.withLock { () -> Bool in
                guard !isCut && !stopped else { return false }
                open += [client, server]
                return true
            }
            guard admitted else {
                Glibc.close(server)
                Glibc.close(client)
                continue
            }
            // Both sockets are closed by whichever direction finishes last, so neither
            // thread ever touches a closed (and maybe reused) descriptor.
            let pending = Countdown(2)
            for (from, to) in [(client, server), (server, client)] {
                let t = Thread { [self] in
                    var buffer = [UInt8](repeating: 0, count: 64 << 10)
                    copy: while true {
                        let rate = lock.withLock { bytesPerSecond }
                        let piece = rate > 0 ? min(buffer.count, max(1, rate / 50)) : buffer.count
                        let n = buffer.withUnsafeMutableBytes { read(from, $0.baseAddress, piece) }
                        // Held: this chunk, or the end of the stream, waits (and nothing
                        // more is read) until healed or cut.
                        while lock.withLock({ isHeld && !isCut && !stopped }) { usleep(10_000) }
                        if n <= 0 || lock.withLock({ isCut || stopped }) { break copy }
                        let pause = lock.withLock { delayMicroseconds }
                        if pause > 0 { usleep(pause) }
                        var off = 0
                        while off < n {
                            // MSG_NOSIGNAL: the other side closing mid-copy (a cut, a killed site)
                            // must end this connection with EPIPE, not the drill process with SIGPIPE.
                            let w = buffer.withUnsafeBytes { send(to, $0.baseAddress! + off, n - off, Int32(MSG_NOSIGNAL)) }
                            if w <= 0 { break copy }
                            off += w
                        }
                        if rate > 0 { usleep(UInt32(min(1_000_000, n * 1_000_000 / rate))) }
                    }
                    shutdown(to, Int32(SHUT_RDWR))
                    shutdown(from, Int32(SHUT_RDWR))
                    if pending.done() {
                        lock.withLock { open.removeAll { $0 == client || $0 == server } }
                        Glibc.close(client)
                        Glibc.close(server)
                    }
                }
                t.start()
            }
        }
    }
}

/// Counts down from n; `done()` is true for the caller that reached zero.
final class Countdown: @unchecked Sendable {
    private let lock = NSLock()
    private var n: Int
    init(_ n: Int) { self.n = n }
    func done() -> Bool { lock.withLock { n -= 1; return n == 0 } }
}

/// Calls `body` with 127.0.0.1:`port` as a `sockaddr` (for bind and connect).
func withLoopback<T>(port: UInt16, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}

/// A drill that could not be set up or run, and why.
public struct DrillError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
