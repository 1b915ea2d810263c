import TandemCore
import TandemModel

/// A log held in memory: the simulated twin of the write-ahead log.
struct SimLog: Sendable {
    var firstLSN: LSN = LSN(1)
    var previousTerm: Term = .zero
    var records: [LogRecord] = []

    var lastLSN: LSN { records.last?.lsn ?? firstLSN.previous }

    func record(at lsn: LSN) -> LogRecord? {
        guard lsn >= firstLSN, lsn <= lastLSN else { return nil }
        return records[Int(lsn.rawValue - firstLSN.rawValue)]
    }

    mutating func truncate(after lsn: LSN) {
        guard lsn < lastLSN else { return }
        let keep = max(0, Int(Int64(lsn.rawValue) - Int64(firstLSN.rawValue) + 1))
        records.removeSubrange(keep...)
    }

    mutating func append(_ rs: [LogRecord]) {
        for r in rs where r.lsn == lastLSN.next { records.append(r) }
    }

    mutating func compact(through lsn: LSN) {
        guard lsn >= firstLSN, let r = record(at: lsn) else { return }
        records.removeFirst(Int(lsn.rawValue - firstLSN.rawValue + 1))
        firstLSN = lsn.next
        previousTerm = r.term
    }

    mutating func reset(after lsn: LSN, term: Term) {
        records = []
        firstLSN = lsn.next
        previousTerm = term
    }

    var view: LogView { LogView(firstLSN: firstLSN, previousTerm: previousTerm, records: records, maxCachedBytes: 64 << 20) }
}

/// Storage work of one Ready, waiting for its simulated fsync.
struct PendingStorage: Sendable {
    var storageID: UInt64
    var hardState: HardState?
    var truncateAfter: LSN?
    var append: [LogRecord]
    var messagesAfterPersist: [Message]
}

/// One simulated site: a real core, an in-memory disk with durable and volatile parts, a
/// drifting clock, and a state machine whose state is a hash of what it applied.
final class SimulatedSite {
    let descriptor: SiteDescriptor
    var id: SiteID { descriptor.id }
    var core: Core?
    /// The core's lease end (its clock) while it may serve lease reads, cached after each
    /// step so checks between steps need not copy the core.
    var leaseUntil: Instant?
    var role: CoreRole = .follower
    var term: Term = .zero
    var commitLSN: LSN = .zero
    var up = true
    var pausedUntil: VirtualTime?
    /// Events that arrived while paused, replayed on resume.
    var deferred: [SimEvent] = []
    /// Incremented at each crash: events of an earlier life are dropped.
    var epoch = 0

    // Clock: local = base + (t - t0) × (1 + ppm / 1e6), continuous when the rate changes.
    private var clockT0: VirtualTime = 0
    private var clockBase: Double
    private(set) var driftPPM: Double

    // Disk.
    var log = SimLog()  // what the core sees: durable plus not yet synced
    var disk = SimLog()  // what survives a crash
    var diskHardState = HardState()
    var pending: [PendingStorage] = []
    /// How many of `pending` the fsync in flight covers (0: none in flight).
    var syncCovering = 0
    var fsyncMS: Double
    var fsyncFails = false
    var diskFull = false

    /// The disk was lost and the site rebuilt empty (`tandemd --rejoin`): it abstains from
    /// elections until it hears a primary, and stays so across crashes until its vote in
    /// that primary's term is durable.
    var rejoining = false

    // State machine (the store's twin): survives crashes, as the database does.
    static let emptyStateHash: UInt64 = 0xCBF2_9CE4_8422_2325
    var appliedLSN: LSN = .zero
    var appliedTerm: Term = .zero
    var stateHash: UInt64 = emptyStateHash
    var snapshot: (lsn: LSN, term: Term, hash: UInt64)?
    var snapshotInFlight = false

    /// Proposals of clients waiting for commit: LSN → write id.
    var proposals: [LSN: Int] = [:]

    init(descriptor: SiteDescriptor, driftPPM: Double, clockOffset: Double, fsyncMS: Double) {
        self.descriptor = descriptor
        self.driftPPM = driftPPM
        clockBase = clockOffset
        self.fsyncMS = fsyncMS
    }

    func localTime(_ t: VirtualTime) -> Instant {
        Instant(clockBase + Double(t - clockT0) * (1 + driftPPM / 1_000_000))
    }

    func setDrift(_ ppm: Double, at t: VirtualTime) {
        clockBase = Double(localTime(t))
        clockT0 = t
        driftPPM = ppm
    }

    var isRunning: Bool { up && pausedUntil == nil && core != nil }

    /// Caches what the simulator reads of the core between steps.
    func remember(_ core: Core) {
        leaseUntil = core.canServeLeaseRead(at: core.now) ? core.leaseUntil : nil
        role = core.role
        term = core.hardState.term
        commitLSN = core.commitLSN
    }

    /// Applies a committed record to the state machine.
    func apply(_ r: LogRecord) {
        var h = stateHash
        func mix(_ v: UInt64) {
            var x = v
            for _ in 0..<8 {
                h = (h ^ (x & 0xFF)) &* 0x0000_0100_0000_01B3
                x >>= 8
            }
        }
        mix(r.lsn.rawValue)
        mix(r.term.rawValue)
        mix(UInt64(r.kind.rawValue))
        // Eight bytes at a time (a multiply-xorshift mix): fast enough for large documents.
        r.payload.withUnsafeBytes { buf in
            var i = 0
            while i + 8 <= buf.count {
                h = (h ^ buf.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0x9E37_79B9_7F4A_7C15
                h ^= h >> 29
                i += 8
            }
            while i < buf.count {
                h = (h ^ UInt64(buf[i])) &* 0x0000_0100_0000_01B3
                i += 1
            }
        }
        stateHash = h
        appliedLSN = r.lsn
        appliedTerm = r.term
    }

    /// The process dies. Writes not yet synced may be lost, or may have reached the disk
    /// anyway (the page cache was flushed): the first `survivingOps` pending storage
    /// operations survive whole, and of the next one only its first `survivingRecords`
    /// records (the record torn in the middle is cut off by recovery, as the log does).
    func crash(survivingOps: Int = 0, survivingRecords: Int = 0) -> (hardStates: [HardState], records: Int) {
        var persistedHard: [HardState] = []
        var recordsKept = 0
        for (i, p) in pending.enumerated() where i <= survivingOps {
            let whole = i < survivingOps
            if whole, let h = p.hardState {
                diskHardState = h
                persistedHard.append(h)
            }
            if whole, let t = p.truncateAfter { disk.truncate(after: t) }
            // A torn op keeps a prefix of its records only if it truncated nothing (the
            // truncation and the appends after it are one ordered unit).
            if whole || p.truncateAfter == nil {
                let kept = whole ? p.append : Array(p.append.prefix(survivingRecords))
                let before = disk.lastLSN
                disk.append(kept)
                recordsKept += Int(disk.lastLSN.rawValue - before.rawValue)
            }
            if !whole { break }
        }
        up = false
        core = nil
        leaseUntil = nil
        role = .follower
        pausedUntil = nil
        deferred = []
        pending = []
        syncCovering = 0
        log = disk
        proposals = [:]
        snapshotInFlight = false
        epoch += 1
        return (persistedHard, recordsKept)
    }

    /// The disk is gone (a fire, a dead array): the process dies and the site is left with
    /// nothing, neither its log, nor its term and vote, nor its database.
    func loseDisk() {
        _ = crash()
        disk = SimLog()
        log = SimLog()
        diskHardState = HardState()
        appliedLSN = .zero
        appliedTerm = .zero
        stateHash = Self.emptyStateHash
        snapshot = nil
        rejoining = true
    }
}
