import Foundation
import Glibc

/// Accepted connections whose handshake has not yet proved anything (for peers: a
/// certificate and hello of this cluster; for HTTPS clients: a completed TLS handshake),
/// at most `limit` at once. With all taken, a newcomer cuts the oldest: its socket is shut
/// down, which ends its thread's wait. Strangers who open connections and send nothing
/// then cannot keep legitimate clients out for a whole handshake timeout each: they
/// would have to open `limit` connections within one legitimate handshake (a few round
/// trips).
///
/// Each registered handshake keeps a duplicate of its socket until it is proven or ends,
/// so the number that is shut down can never have been reused by an unrelated socket.
/// Thread safety: every method may be called from any thread.
final class HandshakeSlots: @unchecked Sendable {
    let limit: Int
    private let lock = NSLock()
    // Guarded by `lock`. Oldest first.
    private var unproven: [(serial: UInt64, socket: Int32)] = []
    /// Cut handshakes whose thread has not finished yet, with their duplicates.
    private var cut: [UInt64: Int32] = [:]
    private var serial: UInt64 = 0

    init(limit: Int) { self.limit = max(1, limit) }

    /// Registers the handshake on `fd`, cutting the oldest unproven one if all `limit`
    /// are taken. Returns its serial, and whether it can be cut (false when the socket
    /// could not be duplicated: out of descriptors).
    func enter(_ fd: Int32) -> (serial: UInt64, cuttable: Bool) {
        let socket = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        return lock.withLock {
            if unproven.count >= limit {
                let oldest = unproven.removeFirst()
                shutdown(oldest.socket, Int32(SHUT_RDWR))
                cut[oldest.serial] = oldest.socket
            }
            serial += 1
            if socket >= 0 { unproven.append((serial, socket)) }
            return (serial, socket >= 0)
        }
    }

    /// The handshake proved itself, or ended: it can no longer be cut. Idempotent.
    func leave(_ serial: UInt64) {
        lock.withLock {
            if let i = unproven.firstIndex(where: { $0.serial == serial }) {
                Glibc.close(unproven.remove(at: i).socket)
            } else if let socket = cut.removeValue(forKey: serial) {
                Glibc.close(socket)
            }
        }
    }

    /// Whether the handshake was cut for a newer connection (until it leaves).
    func wasCut(_ serial: UInt64) -> Bool { lock.withLock { cut[serial] != nil } }
}
