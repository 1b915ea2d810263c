import Foundation
import Glibc
import TandemModel

/// The single-stream TLS ceiling of this machine: OpenSSL on a loopback socket, 64 KiB
/// writes, no Tandem framing. Benchmarks compare the replication stream with it.
public enum TLSCeiling {
    /// Bytes per second moved from a client to a server over one TLS connection in
    /// `seconds`.
    public static func measure(server: TLSContext, client: TLSContext, expectedServerName: String, seconds: Double) throws(TransportError) -> Double {
        signal(SIGPIPE, SIG_IGN)
        let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: 0))
        defer { Glibc.close(listener) }
        guard let port = Transport.localPort(of: listener) else { throw TransportError(.other, "no local port") }
        final class Box: @unchecked Sendable {
            let lock = NSLock()
            var received = 0
            var error: TransportError?
            let done = DispatchSemaphore(value: 0)
        }
        let box = Box()
        let deadlineAll = monotonicNanoseconds() + UInt64((seconds + 10) * 1e9)
        Thread {
            let fd = accept(listener, nil, nil)
            do throws(TransportError) {
                let s = try TLSStream(context: server, fd: fd, isServer: true, expectedPeer: nil)
                try s.handshake(deadline: deadlineAll)
                var buf = [UInt8](repeating: 0, count: 256 << 10)
                var total = 0
                loop: while true {
                    let r = buf.withUnsafeMutableBytes { s.read(into: $0) }
                    switch r {
                    case let .done(n): total += n
                    case let .wouldBlock(readable): try s.wait(events: Int16(readable ? POLLIN : POLLOUT), deadline: deadlineAll)
                    case .closed: break loop
                    }
                }
                box.lock.withLock { box.received = total }
            } catch {
                box.lock.withLock { box.error = error }
            }
            box.done.signal()
        }.start()
        let fd = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 5_000_000_000)
        let c = try TLSStream(context: client, fd: fd, isServer: false, expectedPeer: nil)
        try c.handshake(deadline: deadlineAll)
        let chunk = [UInt8](repeating: 0x42, count: 64 << 10)
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < end {
            try c.writeAll(chunk, deadline: deadlineAll)
        }
        c.close()
        box.done.wait()
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        if let e = box.lock.withLock({ box.error }) { throw e }
        return Double(box.lock.withLock { box.received }) / elapsed
    }
}
