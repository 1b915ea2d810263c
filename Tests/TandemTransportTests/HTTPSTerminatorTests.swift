import Foundation
import Glibc
import Testing
import TandemCore
import TandemModel
@testable import TandemTransport

/// The HTTPS terminator in front of the HTTP API: clients that stop reading, or keep
/// sending to a backend that does not read, cost it neither a spinning CPU nor a slot
/// held for good.
@Suite("HTTPS terminator", .serialized)
struct HTTPSTerminatorTests {
    /// CPU time (clock ticks, 1/100 s) of this process's threads named `name`, and how many.
    static func cpu(ofThreadsNamed name: String) -> (threads: Int, ticks: Int) {
        var threads = 0, ticks = 0
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
            guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
                  comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
                  let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
                  let end = stat.lastIndex(of: ")")
            else { continue }
            // After the command: state (field 3), ..., utime (14), stime (15).
            let fields = stat[stat.index(after: end)...].split(separator: " ")
            guard fields.count > 12 else { continue }
            threads += 1
            ticks += (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
        }
        return (threads, ticks)
    }

    /// A terminator for site "a" in front of a backend whose accepted connections
    /// `backend` is given (on a thread of its own); and a connected, handshaken client.
    static func setUp(idleTimeout: UInt64 = 60_000_000_000, threadName: String, backend: @escaping @Sendable (Int32) -> Void) throws -> (HTTPSTerminator, TLSStream) {
        let backendPort = try Transport.freeLoopbackPort()
        let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: backendPort))
        Thread {
            let fd = accept(listener, nil, nil)
            Glibc.close(listener)
            if fd >= 0 { backend(fd) }
        }.start()
        let pki = TestPKI.shared
        let port = try Transport.freeLoopbackPort()
        let t = HTTPSTerminator(listen: PeerEndpoint(host: "127.0.0.1", port: port), backendPort: backendPort,
                                context: try .httpsServer(files: TLSFiles(certificate: pki.path("a.pem"), privateKey: pki.path("a.key"),
                                                                          certificateAuthority: pki.path("ca.pem"))))
        t.idleTimeoutNanoseconds = idleTimeout
        // A name of its own, so other suites' terminators in the same process are not counted.
        t.connectionThreadName = threadName
        try t.start()
        let fd = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 2_000_000_000)
        let client = try TLSStream(context: try .withoutCertificate(certificateAuthority: pki.path("ca.pem")), fd: fd, isServer: false,
                                   expectedPeer: SiteID("a"))
        try client.handshake(deadline: monotonicNanoseconds() + 5_000_000_000)
        return (t, client)
    }

    @Test("clients that connect and send nothing cannot hold every connection slot")
    func strangersCannotHoldTheSlots() throws {
        let backendPort = try Transport.freeLoopbackPort()
        let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: backendPort))
        Thread {
            let fd = accept(listener, nil, nil)
            Glibc.close(listener)
            if fd >= 0 { sleep(3); Glibc.close(fd) }
        }.start()
        let pki = TestPKI.shared
        let port = try Transport.freeLoopbackPort()
        let t = HTTPSTerminator(listen: PeerEndpoint(host: "127.0.0.1", port: port), backendPort: backendPort,
                                context: try .httpsServer(files: TLSFiles(certificate: pki.path("a.pem"), privateKey: pki.path("a.key"),
                                                                          certificateAuthority: pki.path("ca.pem"))),
                                maxConnections: 8, maxHandshakes: 4)
        t.connectionThreadName = "tst-strangers"
        try t.start()
        defer { t.stop() }
        // As many idle TCP connections as the terminator takes at all: without a bound on
        // handshakes each would hold its slot for the handshake's 10 s.
        var strangers: [Int32] = []
        defer { for fd in strangers { Glibc.close(fd) } }
        for _ in 0..<8 {
            strangers.append(try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 2_000_000_000))
        }
        usleep(300_000)
        let fd = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 2_000_000_000)
        let client = try TLSStream(context: try .withoutCertificate(certificateAuthority: pki.path("ca.pem")), fd: fd, isServer: false,
                                   expectedPeer: SiteID("a"))
        defer { client.close() }
        let start = monotonicNanoseconds()
        #expect(throws: Never.self, "a real client's handshake failed while strangers held the slots") {
            try client.handshake(deadline: start + 2_000_000_000)
        }
    }

    @Test("a client that keeps sending to a backend that reads nothing makes the terminator wait, not spin")
    func fullBufferDoesNotSpin() throws {
        let (t, client) = try Self.setUp(threadName: "tst-full-buf") { fd in
            // Holds the connection and reads nothing, as the API does behind a slow call.
            sleep(5)
            Glibc.close(fd)
        }
        defer { t.stop(); client.close() }
        // Fill every buffer on the way: the client's, the terminator's and the backend's.
        let chunk = [UInt8](repeating: 0x41, count: 64 << 10)
        var sent = 0
        var blockedSince: UInt64?
        while sent < 256 << 20 {
            switch chunk.withUnsafeBytes({ client.write($0) }) {
            case let .done(n):
                sent += n
                blockedSince = nil
            case .wouldBlock:
                let now = monotonicNanoseconds()
                if let s = blockedSince, now - s > 500_000_000 { break }
                blockedSince = blockedSince ?? now
                usleep(10_000)
                continue
            case .closed:
                Issue.record("the terminator closed the connection")
                return
            }
            if let s = blockedSince, monotonicNanoseconds() - s > 500_000_000 { break }
        }
        #expect(sent > 64 << 10)
        let before = Self.cpu(ofThreadsNamed: "tst-full-buf")
        #expect(before.threads == 1)
        usleep(1_000_000)
        let after = Self.cpu(ofThreadsNamed: "tst-full-buf")
        // Spinning, the thread would take the whole second (100 ticks).
        #expect(after.ticks - before.ticks < 20, "the terminator used \(after.ticks - before.ticks) ticks in 1 s while nothing could move")
    }

    @Test("a client that closed its side and never reads is let go after the idle timeout, without spinning meanwhile")
    func closedClientIsLetGo() throws {
        let (t, client) = try Self.setUp(idleTimeout: 1_000_000_000, threadName: "tst-closed") { fd in
            // An answer far larger than the buffers, then the connection held open.
            let chunk = [UInt8](repeating: 0x42, count: 64 << 10)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            let until = monotonicNanoseconds() + 6_000_000_000
            while monotonicNanoseconds() < until {
                if chunk.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress!, $0.count) }) < 0 { usleep(20_000) }
            }
            Glibc.close(fd)
        }
        defer { t.stop(); client.close() }
        usleep(300_000)
        client.finishWriting()
        let start = Self.cpu(ofThreadsNamed: "tst-closed")
        var gone = false
        for _ in 0..<40 where !gone {
            usleep(100_000)
            gone = Self.cpu(ofThreadsNamed: "tst-closed").threads == 0
        }
        #expect(gone, "the connection still holds its slot 4 s after it went idle with a 1 s timeout")
        let end = Self.cpu(ofThreadsNamed: "tst-closed")
        #expect(gone || end.ticks - start.ticks < 100, "the terminator spun while the client read nothing")
    }
}
