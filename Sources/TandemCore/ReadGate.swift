import TandemModel

/// Reads that asked to reflect at least some LSN, waiting within a deadline until this
/// site has applied it: read-your-writes on any site. Pure, like the core: the driver
/// reports applied LSNs and the time.
public struct ReadGate<ReadID: Hashable & Sendable>: Sendable {
    public enum Decision: Hashable, Sendable {
        /// Serve now: the site has applied the LSN.
        case ready
        /// Queued until `applied` reaches it or `expire` passes its deadline.
        case waiting
        /// Too many reads wait already: refuse (the caller answers 503).
        case refused(limit: Int)
    }

    public let maxWaiting: Int
    private var waiting: [(id: ReadID, minLSN: LSN, deadline: Instant)] = []

    public init(maxWaiting: Int = 10_000) {
        self.maxWaiting = maxWaiting
    }

    public var count: Int { waiting.count }

    public mutating func wait(_ id: ReadID, minLSN: LSN, appliedLSN: LSN, deadline: Instant) -> Decision {
        if appliedLSN >= minLSN { return .ready }
        guard waiting.count < maxWaiting else { return .refused(limit: maxWaiting) }
        waiting.append((id, minLSN, deadline))
        return .waiting
    }

    /// The site applied through `lsn`: the reads now ready, in arrival order.
    public mutating func applied(_ lsn: LSN) -> [ReadID] {
        var ready: [ReadID] = []
        waiting.removeAll { w in
            guard w.minLSN <= lsn else { return false }
            ready.append(w.id)
            return true
        }
        return ready
    }

    /// The reads whose deadline passed (answered with a timeout).
    public mutating func expire(now: Instant) -> [ReadID] {
        var expired: [ReadID] = []
        waiting.removeAll { w in
            guard now >= w.deadline else { return false }
            expired.append(w.id)
            return true
        }
        return expired
    }
}
