import Foundation
import Glibc
import TandemCore
import TandemModel
import TandemStore
import TandemTransport
import TandemWAL

/// Settings of one running site.
public struct NodeSettings: Sendable {
    public var config: ClusterConfig
    public var site: SiteID
    public var clusterID: ClusterID
    public var dataDirectory: String
    public var transport: TransportSettings
    public var walOptions = WALOptions()
    public var storeLimits = StoreLimits()
    /// How often the core is ticked.
    public var tickNanoseconds: UInt64 = 10_000_000
    /// A local snapshot is taken (and the log it covers removed, as retention allows)
    /// once this many records were applied since the last one. 0: never.
    public var snapshotEveryRecords = 100_000
    /// ... and once the log written since the last one is at least this fraction of the
    /// database's size (0: the record count alone decides). A snapshot copies the whole
    /// database: with the record count alone, a large database was copied every 100,000
    /// records however small they were, a cost growing with the database's size.
    public var snapshotLogFraction = 0.5
    public var retention = RetentionPolicy()
    /// Bytes per snapshot chunk (each checksummed; a transfer resumes at a chunk boundary).
    public var snapshotChunkBytes = Wire.snapshotChunkBytes
    /// Pause between snapshot chunks sent (testing seam: slows a transfer so it can be cut).
    public var snapshotChunkPauseMicroseconds: UInt32 = 0
    /// Log lines (one event per line, key=value).
    public var log: @Sendable (String) -> Void = { _ in }
    /// Called (on the loop thread: return quickly) for each role change, with the term.
    public var onRoleChange: @Sendable (RoleChange) -> Void = { _ in }
    /// Schema migrations (each a schema batch with its version) the primary brings the
    /// database to, through the log, when it finds the database at an older version.
    public var schemaMigrations: [WriteBatch] = []
    /// Reads waiting for an LSN (`min_lsn`) or for their commit, at most.
    public var maxWaitingReads = 10_000
    /// Forwarded API calls served at once for other sites, at most (beyond: 503).
    public var maxForwardedInFlight = 1_024
    /// Called (on the loop thread: return quickly) with the number of writes in each
    /// group proposed together (how well writes that arrive together are batched).
    public var onProposal: @Sendable (Int) -> Void = { _ in }

    public init(config: ClusterConfig, site: SiteID, clusterID: ClusterID, dataDirectory: String, transport: TransportSettings) {
        self.config = config
        self.site = site
        self.clusterID = clusterID
        self.dataDirectory = dataDirectory
        self.transport = transport
    }
}

/// Why a write failed.
public enum WriteError: Error, CustomStringConvertible, Sendable {
    case notPrimary(SiteID?)
    case refused(ProposalError)
    case store(StoreError)
    /// The primary lost its office before the write committed: it may or may not have
    /// committed (the client should check, for example by reading it back).
    case outcomeUnknown(String)
    /// The primary lost its office and the write is known not to have committed: another
    /// record was committed at its LSN. Safe to retry.
    case notCommitted(String)
    case stopped

    public var description: String {
        switch self {
        case let .notPrimary(p): "this site is not the primary" + (p.map { " (the primary is \($0))" } ?? "")
        case .stopped: "the site is stopping"
        case let .refused(e): "\(e)"
        case let .store(e): "\(e)"
        case let .outcomeUnknown(why): "outcome unknown: \(why)"
        case let .notCommitted(why): "not committed: \(why)"
        }
    }
}

/// How fresh a read must be.
public enum ReadConsistency: String, Sendable {
    /// Reflects every write acknowledged before the read began: served by the primary
    /// under a valid lease (other sites forward it).
    case linearizable
    /// This site's own committed state, possibly stale; with `minLSN`, at least that LSN.
    case local
}

/// A read asked of this site.
public struct ReadRequest: Sendable {
    public var statement: SQLStatement
    public var consistency: ReadConsistency
    public var minLSN: LSN
    /// Monotonic (CLOCK_BOOTTIME) deadline, in nanoseconds.
    public var deadline: UInt64
    public init(statement: SQLStatement, consistency: ReadConsistency, minLSN: LSN = .zero, deadline: UInt64) {
        self.statement = statement
        self.consistency = consistency
        self.minLSN = minLSN
        self.deadline = deadline
    }
}

/// Why a read failed.
public enum ReadError: Error, CustomStringConvertible, Sendable {
    /// Linearizable reads are served by the primary under a valid lease.
    case notPrimary(SiteID?)
    /// `min_lsn` was not applied here (or a primary's read not committed) before the deadline.
    case timedOut(waitingFor: LSN, applied: LSN)
    case tooManyWaiting(limit: Int)
    case store(StoreError)
    case stopped

    public var description: String {
        switch self {
        case let .notPrimary(p): "this site is not the primary" + (p.map { " (the primary is \($0))" } ?? "")
        case let .timedOut(lsn, applied): "this site had not reached LSN \(lsn) before the deadline (it is at \(applied))"
        case let .tooManyWaiting(limit): "more than \(limit) reads are waiting"
        case let .store(e): "\(e)"
        case .stopped: "the site is stopping"
        }
    }
}

/// Why a forwarded call got no answer.
public enum ForwardError: Error, Sendable, CustomStringConvertible {
    case noPrimary
    case notConnected(SiteID)
    case timedOut(SiteID)
    case tooMany(limit: Int)
    public var description: String {
        switch self {
        case .noPrimary: "no primary is known"
        case let .notConnected(p): "the primary \(p) is not connected"
        case let .timedOut(p): "the primary \(p) did not answer before the deadline"
        case let .tooMany(limit): "more than \(limit) calls are being forwarded"
        }
    }
}

/// What a site reports about itself.
public struct SiteStatus: Sendable {
    public var site: SiteID
    public var role: CoreRole
    public var term: Term
    public var primary: SiteID?
    public var commitLSN: LSN
    public var appliedLSN: LSN
    public var logFirstLSN: LSN
    public var logLastLSN: LSN
    public var holdsLease: Bool
    /// A follower that has heard from its primary within a lease (its promise runs).
    public var followsLivePrimary: Bool
    /// The site stopped after a storage error (fail-stop).
    public var failed: Bool
    /// The commit LSN its primary last announced (a replica's lag in records is the
    /// distance from its applied LSN to it).
    public var primaryCommitLSN: LSN = .zero
    /// Nanoseconds since this site last held everything its primary had committed (0
    /// while caught up; on a primary, 0).
    public var lagNanoseconds: UInt64 = 0
    /// Nanoseconds left on this site's lease (0 unless it holds one).
    public var leaseLeftNanoseconds: UInt64 = 0
    /// The primary's view of each peer (empty on other sites).
    public var peers: [SiteID: PeerView] = [:]

    /// What the primary knows of one peer.
    public struct PeerView: Sendable {
        public var matchLSN: LSN
        /// Nanoseconds since the peer last answered.
        public var sinceContactNanoseconds: UInt64
        /// Nanoseconds since the oldest record the peer lacks was written (0: in step).
        public var lagNanoseconds: UInt64
    }
}

/// Drives one site's core with a real clock (CLOCK_BOOTTIME), real files and real
/// sockets: the daemon's heart. One loop thread owns the core, the storage and all
/// decisions; the transport's threads and the log's writer only hand it inputs.
public final class SiteRuntime: @unchecked Sendable {
    public let settings: NodeSettings
    public let storage: SiteStorage
    public let transport: Transport

    // Owned by the loop thread (inputs arrive through `inbox`).
    private var core: Core
    private var rng: SeededRandom
    private var storageQueue: [(id: UInt64, after: [Message], done: Bool)] = []
    private var waiters: [LSN: (term: Term, resume: @Sendable (Result<Execution, WriteError>) -> Void, execution: Execution)] = [:]
    /// Writes of a primary that stepped down before they committed: the log they were
    /// written to decides. Once the commit LSN passes one, the term of the record there says
    /// whether it committed (same term) or was replaced (another term): the client learns
    /// which instead of "outcome unknown". Unresolved after `orphanWaitNanoseconds`: unknown.
    private var orphans: [LSN: (term: Term, resume: @Sendable (Result<Execution, WriteError>) -> Void, execution: Execution, deadline: Instant)] = [:]
    static let orphanWaitNanoseconds: UInt64 = 10_000_000_000
    private var lastSnapshotLSN: LSN = .zero
    /// The log's size when the last snapshot was taken (0 when the site started: the whole
    /// log counts): the log written since is its growth beyond this.
    private var logBytesAtLastSnapshot = 0
    private var nextSnapshotSizeCheck: LSN = .zero
    private var snapshotReceive: (lsn: LSN, term: Term, size: UInt64, path: String, peer: SiteID)?
    /// When the current snapshot's creation and reception began (for the log's durations).
    private var snapshotStarted: Instant = 0
    private var snapshotReceiveStarted: Instant = 0
    private var sendingSnapshot: Set<SiteID> = []
    private var snapshotInProgress = false
    /// Set by `failStop` (loop thread): nothing more of the inputs at hand is carried out.
    private var stoppedByFailure = false
    /// Snapshots installed from peers so far: a local snapshot started before one of them
    /// is discarded when it is done.
    private var snapshotsInstalled = 0
    /// The no-op of a new primary whose log tail the database does not reflect yet.
    private var primaryCatchUp: [LogRecord]?
    /// Reads waiting until this site's visible state reaches their `minLSN`.
    private var readGate: ReadGate<UInt64>
    private var gatedReads: [UInt64: (request: ReadRequest, resume: @Sendable (Result<QueryResult, ReadError>) -> Void)] = [:]
    /// Reads a primary ran whose result includes records not yet committed: answered once
    /// those commit, failed if this site loses its office first (no dirty read escapes).
    private var commitWaits: [(lsn: LSN, term: Term, deadline: UInt64, result: QueryResult,
                               resume: @Sendable (Result<QueryResult, ReadError>) -> Void)] = []
    private var nextReadID: UInt64 = 0
    /// When records were written here (primary) or learned committed (replica), sampled:
    /// lag in time is read from it.
    private var positionTimes: [(lsn: LSN, at: Instant)] = []
    /// The last time this site held everything its primary had committed.
    private var caughtUpAt: Instant = 0
    /// When each peer was last heard from (any message).
    private var lastHeard: [SiteID: Instant] = [:]
    /// The term in which this site, as primary, proposed the pending schema migrations.
    private var migratedInTerm: Term?

    // Forwarded calls this site waits on (any thread; guarded by `forwardLock`).
    private let forwardLock = NSLock()
    private var pendingForwards: [UInt64: (peer: SiteID, deadline: UInt64, resume: @Sendable (Result<ForwardedAnswer, ForwardError>) -> Void)] = [:]
    /// Starts at a random point, not at zero: an answer the primary sends for a call of
    /// this site's previous run (it restarted and reconnected meanwhile) must not match a
    /// new call that reused its id, which would hand one client another's answer.
    private var nextForwardID = UInt64.random(in: 0..<(UInt64.max / 2))
    private var forwardedInFlight = 0
    /// Set when the loop has ended: no new forward may wait for an answer that no one expires.
    private var forwardsClosed = false
    private var forwardHandler: ForwardHandler?

    private let cond = NSCondition()
    // Guarded by `cond`.
    private var inbox: [Input] = []
    private var running = false
    private var exited = false
    private var statusCache: SiteStatus
    private var droppedMessages = 0
    /// Guarded by `cond`: the lease end while the core may serve lease reads.
    private var leaseValidUntil: Instant?
    /// Guarded by `cond`: until when this follower's promise to a known primary runs.
    private var followingUntil: Instant?

    enum Input {
        case message(Message)
        case walDone(UInt64, Result<LSN, WALError>)
        case snapshotFrame(SiteID, SnapshotFrame)
        case write(WriteBatch, @Sendable (Result<Execution, WriteError>) -> Void)
        case event(CoreEvent)
        case snapshotSent(SiteID)
        case retryAppend(UInt64, [LogRecord])
        case snapshotTaken(installs: Int, Result<SiteStorage.PreparedSnapshot, SnapshotFailure>)
        case read(ReadRequest, @Sendable (Result<QueryResult, ReadError>) -> Void)
        case withStore(@Sendable (StateStore?) -> Void)
    }

    var hardStatePath: String { settings.dataDirectory + "/hardstate" }
    /// Present while a site rebuilt without its votes abstains (see `Core.abstaining`).
    static func rejoiningPath(_ dataDirectory: String) -> String { dataDirectory + "/rejoining" }

    /// Creates a new site's storage (refusing existing data). `rejoining`: the site is
    /// rebuilt for a cluster it belonged to and lost its term and vote: it abstains from
    /// elections until it hears the current primary.
    public static func bootstrap(dataDirectory: String, clusterID: ClusterID, walOptions: WALOptions = WALOptions(),
                                 rejoining: Bool = false) throws {
        let s = try SiteStorage.bootstrap(dataDirectory: dataDirectory, clusterID: clusterID, walOptions: walOptions)
        s.close()
        if rejoining { try markRejoining(dataDirectory: dataDirectory) }
    }

    /// Marks a (stopped) site as rejoining without its votes.
    public static func markRejoining(dataDirectory: String) throws {
        try Durable.writeFile(Array("rebuilt without its term and vote: abstains until it hears a primary\n".utf8),
                              to: rejoiningPath(dataDirectory))
    }

    /// Client writes and queries run on the loop that also takes the acknowledgements
    /// renewing a primary's lease. The loop starts no client call after G (a group's time)
    /// in a round, but a group started just before may run its own G, one write past it up
    /// to W (a call's limit) and a rerun of up to G when a write rolled the transaction
    /// back: a round's client phase lasts at most 3G + W, and an acknowledgement waits
    /// about two rounds at most. With W a sixth of the lease and G a thirtieth, two such
    /// rounds and a heartbeat interval (at most a third) stay within the lease
    /// (tandemd's defaults: W 250 ms, G 50 ms, rounds of at most 400 ms, lease 1.5 s).
    static func loopBounded(_ limits: StoreLimits, _ timing: Timing) -> StoreLimits {
        var bounded = limits
        func capped(_ value: UInt64, _ cap: UInt64) -> UInt64 { value == 0 ? cap : min(value, cap) }
        bounded.maxWriteNanoseconds = capped(limits.maxWriteNanoseconds, max(1, timing.leaseDuration / 6))
        bounded.maxGroupNanoseconds = capped(limits.maxGroupNanoseconds, max(1, timing.leaseDuration / 30))
        return bounded
    }

    public init(settings: NodeSettings, tls: TLSContext) throws {
        self.settings = settings
        storage = try SiteStorage.open(dataDirectory: settings.dataDirectory, clusterID: settings.clusterID,
                                       walOptions: settings.walOptions, limits: Self.loopBounded(settings.storeLimits, settings.config.timing))
        let hard = try Self.loadHardState(settings.dataDirectory + "/hardstate")
        let log = storage.log
        let view = LogView(firstLSN: log.firstLSN, previousTerm: log.term(at: log.firstLSN.previous) ?? .zero,
                           lastLSN: log.lastLSN, termRuns: log.termRunsSnapshot)
        rng = SeededRandom(seed: monotonicNanoseconds() ^ UInt64(getpid()))
        readGate = ReadGate(maxWaiting: settings.maxWaitingReads)
        let rejoining = access(Self.rejoiningPath(settings.dataDirectory), F_OK) == 0
        core = try Core(id: settings.site, config: settings.config, hardState: hard, log: view,
                        commitLSN: storage.store.committedLSN, now: Self.clock(), entropy: rng.next(), abstaining: rejoining)
        if rejoining { settings.log("event=rejoining site=\(settings.site) detail=\"no vote and no candidacy until a primary is heard\"") }
        lastSnapshotLSN = storage.store.appliedLSN
        // The whole log counts as written since the last snapshot: what was logged before a
        // restart must not be forgotten (a site restarted often would otherwise never take
        // one). At worst, one snapshot comes early.
        logBytesAtLastSnapshot = 0
        statusCache = SiteStatus(site: settings.site, role: .follower, term: hard.term, primary: nil, commitLSN: .zero,
                                 appliedLSN: storage.store.appliedLSN, logFirstLSN: log.firstLSN, logLastLSN: log.lastLSN, holdsLease: false,
                                 followsLivePrimary: false, failed: false)
        transport = Transport(settings: settings.transport, context: tls, log: settings.log, onMessage: { _ in })
        transport.setHandlers(onMessage: { [weak self] m in self?.enqueue(.message(m)) },
                              onSnapshotFrame: { [weak self] peer, f in self?.enqueue(.snapshotFrame(peer, f)) },
                              onForwardFrame: { [weak self] peer, f in self?.forwardFrame(peer, f) })
    }

    /// The local clock for leases: CLOCK_BOOTTIME keeps counting through a suspension.
    static func milliseconds(since t: Instant) -> UInt64 { (clock() - min(t, clock())) / 1_000_000 }

    static func clock() -> Instant {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func loadHardState(_ path: String) throws -> HardState {
        // Only a missing file means "no term, no vote yet"; an unreadable one must stop the
        // start, or the site could vote twice in a term.
        guard access(path, F_OK) == 0 else { return HardState() }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw StoreError.io("cannot read \(path): \(String(cString: strerror(errno)))")
        }
        var r = ByteReader([UInt8](data))
        let term = Term(try r.u64("term"))
        let voted = try r.string("voted for", limit: 256)
        return HardState(term: term, votedFor: voted.isEmpty ? nil : SiteID(voted))
    }

    func saveHardState(_ h: HardState) throws {
        var w = ByteWriter()
        w.u64(h.term.rawValue)
        w.string(h.votedFor?.name ?? "")
        try Durable.writeFile(w.bytes, to: hardStatePath)
    }

    // MARK: Lifecycle

    public func start() throws {
        try transport.start()
        cond.withLock { running = true }
        let t = Thread { [self] in
            nameCurrentThread("site-\(settings.site)")
            loop()
        }
        t.start()
    }

    /// Stops the loop, the transport and the log. Writes still waiting fail.
    public func stop() {
        cond.withLock {
            running = false
            cond.broadcast()
            while !exited { cond.wait() }
        }
        transport.stop()
        storage.close()
    }

    /// The site's state. Whether it holds the lease is decided now, against the clock,
    /// not when the loop last published (a stalled loop must not keep claiming a lease).
    public var status: SiteStatus {
        let (s, until, followUntil) = cond.withLock { (statusCache, leaseValidUntil, followingUntil) }
        var out = s
        let now = Self.clock()
        out.holdsLease = until.map { now < $0 } ?? false
        // Like the lease: a stalled loop must not keep the site in the read pool.
        out.followsLivePrimary = s.followsLivePrimary && (followUntil.map { now < $0 } ?? false)
        out.leaseLeftNanoseconds = until.map { $0 > now ? $0 - now : 0 } ?? 0
        return out
    }

    /// Runs a write batch on this site if it is the primary; `completion` runs on the
    /// site's loop thread once it committed or failed (at once, on the caller's thread,
    /// when the site has stopped), so it must be quick.
    public func write(_ batch: WriteBatch, completion: @escaping @Sendable (Result<Execution, WriteError>) -> Void) {
        enqueue(.write(batch, completion))
    }

    /// Runs a write batch on this site if it is the primary, and returns once committed.
    public func write(_ batch: WriteBatch) async throws(WriteError) -> Execution {
        let result: Result<Execution, WriteError> = await withCheckedContinuation { c in
            enqueue(.write(batch, { c.resume(returning: $0) }))
        }
        return try result.get()
    }

    /// Runs a read on this site. `linearizable` needs this site to be the primary with a
    /// valid lease (callers forward it otherwise); `local` reads this site's committed
    /// state once it reaches `minLSN`, waiting until the request's deadline. `completion`
    /// runs on the site's loop thread (or at once when the site has stopped): be quick.
    public func read(_ request: ReadRequest, completion: @escaping @Sendable (Result<QueryResult, ReadError>) -> Void) {
        enqueue(.read(request, completion))
    }

    /// Runs a read on this site (see `read(_:completion:)`) and returns its result.
    public func read(_ request: ReadRequest) async throws(ReadError) -> QueryResult {
        let result: Result<QueryResult, ReadError> = await withCheckedContinuation { c in
            enqueue(.read(request, { c.resume(returning: $0) }))
        }
        return try result.get()
    }

    /// Runs `body` on the loop thread, which owns the database (state hashes, exports
    /// that must not race with applies).
    public func withStore<T: Sendable>(_ body: @escaping @Sendable (StateStore) throws -> T) async throws -> T {
        let r: Result<T, any Error> = await withCheckedContinuation { c in
            enqueue(.withStore({ store in
                guard let store else { return c.resume(returning: .failure(WriteError.stopped)) }
                c.resume(returning: Result { try body(store) })
            }))
        }
        return try r.get()
    }

    /// The local clock, for deadlines of reads (CLOCK_BOOTTIME, nanoseconds).
    public static var now: UInt64 { clock() }

    /// Serves a call another site forwarded: hands its answer to the reply closure, once.
    public typealias ForwardHandler = @Sendable (SiteID, ForwardedCall, @escaping @Sendable (ForwardedAnswer) -> Void) -> Void

    /// Serves API calls other sites forward to this one (set before `start`).
    public func setForwardHandler(_ handler: @escaping ForwardHandler) {
        forwardLock.withLock { forwardHandler = handler }
    }

    /// Whether `peer` was heard within a lease, on its connection's thread (so a busy
    /// loop here does not make a live primary look gone): the test before forwarding.
    public func heardWithinLease(_ peer: SiteID) -> Bool {
        guard let t = transport.lastReceived(from: peer) else { return false }
        let now = monotonicNanoseconds()  // the transport's clock (CLOCK_MONOTONIC)
        return now - min(t, now) < UInt64(settings.config.timing.leaseDuration)
    }

    /// Sends an API call to `peer` (the primary) over the peer TLS link and waits for its
    /// answer until the call's deadline.
    public func forward(_ call: ForwardedCall, to peer: SiteID) async -> Result<ForwardedAnswer, ForwardError> {
        await withCheckedContinuation { c in forward(call, to: peer) { c.resume(returning: $0) } }
    }

    /// Sends an API call to `peer` over the peer TLS link; `completion` runs once, with the
    /// answer (on the connection's thread) or the failure (at the call's deadline at the
    /// latest; at once, on the caller's thread, when it cannot be sent), and must be quick.
    public func forward(_ call: ForwardedCall, to peer: SiteID,
                        completion: @escaping @Sendable (Result<ForwardedAnswer, ForwardError>) -> Void) {
        guard transport.connectedPeers.contains(peer) else { return completion(.failure(.notConnected(peer))) }
        let deadline = Self.clock() + UInt64(call.deadlineMilliseconds) * 1_000_000
        let id: UInt64? = forwardLock.withLock {
            guard !forwardsClosed, pendingForwards.count < settings.maxForwardedInFlight else { return nil }
            nextForwardID += 1
            pendingForwards[nextForwardID] = (peer, deadline, completion)
            return nextForwardID
        }
        guard let id else { return completion(.failure(.tooMany(limit: settings.maxForwardedInFlight))) }
        if !transport.send(.request(id: id, call: call), to: peer) {
            let waiter = forwardLock.withLock { pendingForwards.removeValue(forKey: id) }
            waiter?.resume(.failure(.notConnected(peer)))
        }
    }

    private func forwardFrame(_ peer: SiteID, _ frame: ForwardFrame) {
        switch frame {
        case let .response(id, answer):
            let waiter = forwardLock.withLock { () -> (peer: SiteID, deadline: UInt64, resume: @Sendable (Result<ForwardedAnswer, ForwardError>) -> Void)? in
                guard let w = pendingForwards[id], w.peer == peer else { return nil }
                pendingForwards[id] = nil
                return w
            }
            waiter?.resume(.success(answer))
        case let .request(id, call):
            let (handler, admitted): (ForwardHandler?, Bool) = forwardLock.withLock {
                guard forwardHandler != nil, forwardedInFlight < settings.maxForwardedInFlight else { return (forwardHandler, false) }
                forwardedInFlight += 1
                return (forwardHandler, true)
            }
            let transport = self.transport
            guard admitted, let handler else {
                let body = Array(#"{"error":{"code":"overloaded","message":"too many forwarded calls in progress"}}"#.utf8)
                let headers = [ForwardedHeader(name: "Content-Type", value: "application/json"), ForwardedHeader(name: "Retry-After", value: "1")]
                transport.send(.response(id: id, answer: ForwardedAnswer(status: 503, headers: headers, body: body)), to: peer)
                return
            }
            handler(peer, call) { [weak self] answer in
                transport.send(.response(id: id, answer: answer), to: peer)
                self?.forwardLock.withLock { self?.forwardedInFlight -= 1 }
            }
        }
    }

    /// Forwarded calls whose deadline passed get their answer: timed out.
    /// `deposed`: calls waiting on a site this one no longer follows as a live primary
    /// (it went silent for a lease, or another primary took over) end now rather than at
    /// their deadline: the caller learns at once that the outcome is unknown.
    private func expireForwards(_ now: UInt64, deposed: (SiteID) -> Bool = { _ in false }) {
        let expired = forwardLock.withLock { () -> [(SiteID, @Sendable (Result<ForwardedAnswer, ForwardError>) -> Void)] in
            let gone = pendingForwards.filter { $0.value.deadline <= now || deposed($0.value.peer) }
            for id in gone.keys { pendingForwards[id] = nil }
            return gone.values.map { ($0.peer, $0.resume) }
        }
        for (peer, resume) in expired { resume(.failure(.timedOut(peer))) }
    }

    /// Starts a switchover to `target`.
    public func transferLeadership(to target: SiteID) { enqueue(.event(.transferLeadership(to: target))) }

    /// Peer messages waiting beyond this are dropped (the protocol re-sends what
    /// matters), so a flood cannot grow memory without bound while the loop is busy.
    static let maxQueuedPeerMessages = 50_000

    func enqueue(_ input: Input) {
        let accepted: Bool = cond.withLock {
            if exited || (!running && statusCache.failed) { return false }
            if case .message = input, inbox.count >= Self.maxQueuedPeerMessages {
                droppedMessages += 1
                return true
            }
            inbox.append(input)
            cond.signal()
            return true
        }
        if !accepted { Self.refuse(input) }
    }

    /// Answers a caller whose input arrived after the loop stopped.
    private static func refuse(_ input: Input) {
        switch input {
        case let .write(_, resume): resume(.failure(.stopped))
        case let .read(_, resume): resume(.failure(.stopped))
        case let .withStore(body): body(nil)
        default: break
        }
    }

    // MARK: The loop

    /// Inputs of the loop's current batch not handled yet (loop thread only).
    private var inputsWaiting = 0
    /// Client calls (writes, reads, work on the store) taken from the inbox and not carried
    /// out yet, oldest first (loop thread only). A round carries them out after its other
    /// inputs, for at most the store's group time (at least one call or group of writes):
    /// a burst of slow calls then cannot hold back the acknowledgements that renew a
    /// primary's lease, which otherwise waited behind all of them.
    private var clientCalls: [Input] = []
    /// Largest inbox buffer kept from one round to the next.
    static let keptInboxCapacity = 4096

    private func loop() {
        var nextTick = Self.clock()
        func tickIfDue() {
            guard Self.clock() >= nextTick else { return }
            step(.tick)
            if !blockedAppends.isEmpty {
                retryBlockedAppends()
                drainStorageQueue()
            }
            maybeSnapshot()
            maybeMigrateSchema()
            expireReads(Self.clock())
            nextTick = Self.clock() + settings.tickNanoseconds
        }
        /// Carries out client calls, oldest first, until the round's time for them is up.
        func runClientCalls() {
            let budget = storage.store.limits.maxGroupNanoseconds
            let started = Self.clock()
            var k = 0
            while k < clientCalls.count && !stoppedByFailure {
                if k > 0 && budget != 0 && Self.clock() - started >= budget { break }
                if case .write = clientCalls[k] {
                    // Writes that wait together are executed one after the other and proposed
                    // as one group: one log append and one message per peer for all of them.
                    var writes: [(WriteBatch, @Sendable (Result<Execution, WriteError>) -> Void)] = []
                    var j = k
                    while j < clientCalls.count, writes.count < Self.maxWritesPerProposal, case let .write(w, resume) = clientCalls[j] {
                        writes.append((w, resume))
                        j += 1
                    }
                    inputsWaiting = clientCalls.count - j
                    // The group may stop short at its time: the rest stay for the next round.
                    k += write(writes)
                } else {
                    inputsWaiting = clientCalls.count - k - 1
                    handle(clientCalls[k])
                    k += 1
                }
                tickIfDue()
            }
            clientCalls.removeFirst(k)
            inputsWaiting = 0
            if stoppedByFailure {
                for call in clientCalls { Self.refuse(call) }
                clientCalls = []
            }
        }
        // The inbox and this batch trade buffers under the lock, each keeping its
        // capacity: copying the inbox out and emptying it allocated a buffer per round.
        var batch: [Input] = []
        while true {
            let more: Bool = cond.withLock {
                while inbox.isEmpty && clientCalls.isEmpty && running && Self.clock() < nextTick {
                    _ = cond.wait(until: Date(timeIntervalSinceNow: Double(nextTick - min(nextTick, Self.clock())) / 1e9))
                }
                if !running { return false }
                swap(&inbox, &batch)
                return true
            }
            guard more else { break }
            var i = 0
            while i < batch.count {
                if stoppedByFailure {
                    // Stopped midway (a storage error): the rest is refused, not carried out
                    // on storage no longer trusted.
                    for input in batch[i...] { Self.refuse(input) }
                    break
                }
                let input = batch[i]
                i += 1
                switch input {
                case .write, .read, .withStore:
                    clientCalls.append(input)
                default:
                    inputsWaiting = batch.count - i + clientCalls.count
                    handle(input)
                }
            }
            inputsWaiting = 0
            // Handled: their payloads and closures go now. A buffer grown by a burst is let
            // go rather than kept (it and the inbox trade places, so each would stay that size).
            if batch.capacity > Self.keptInboxCapacity { batch = [] } else { batch.removeAll(keepingCapacity: true) }
            tickIfDue()
            if !clientCalls.isEmpty {
                // The lease the acknowledgements just renewed shows before the client calls.
                publishStatus()
                runClientCalls()
            }
            publishStatus()
        }
        for call in clientCalls { Self.refuse(call) }
        clientCalls = []
        // Their records may already be on other sites (appends go out before the local
        // fsync) and commit under the next primary: the outcome is unknown, not "stopped".
        for (_, w) in waiters { w.resume(.failure(.outcomeUnknown("the site stopped before the write committed"))) }
        waiters = [:]
        for (_, w) in orphans { w.resume(.failure(.outcomeUnknown("the site stopped before it learned whether the write committed"))) }
        orphans = [:]
        for (_, r) in gatedReads { r.resume(.failure(.stopped)) }
        gatedReads = [:]
        for w in commitWaits { w.resume(.failure(.stopped)) }
        commitWaits = []
        forwardLock.withLock { forwardsClosed = true }
        expireForwards(.max)
        let rest: [Input] = cond.withLock {
            exited = true
            cond.broadcast()
            defer { inbox = [] }
            return inbox
        }
        for input in rest { Self.refuse(input) }
    }

    private func publishStatus() {
        let now = Self.clock()
        let s = SiteStatus(site: settings.site, role: core.role, term: core.hardState.term, primary: core.primaryID, commitLSN: core.commitLSN,
                           appliedLSN: storage.store.appliedLSN, logFirstLSN: storage.log.firstLSN, logLastLSN: storage.log.lastLSN,
                           holdsLease: core.canServeLeaseRead(at: now),
                           followsLivePrimary: core.role == .follower && core.primaryID != nil && now < core.promiseUntil,
                           failed: false, primaryCommitLSN: core.role == .primary ? core.commitLSN : max(core.primaryCommitLSN, core.commitLSN),
                           lagNanoseconds: lagNanoseconds(now), peers: peerViews(now))
        let until: Instant? = core.canServeLeaseRead(at: now) ? core.leaseUntil : nil
        let follow: Instant? = s.followsLivePrimary ? core.promiseUntil : nil
        cond.withLock {
            statusCache = s
            leaseValidUntil = until
            followingUntil = follow
        }
    }

    private func handle(_ input: Input) {
        switch input {
        case let .message(m):
            lastHeard[m.from] = Self.clock()
            step(.message(m))
        case let .event(e): step(e)
        case let .walDone(id, result):
            if case let .failure(error) = result {
                // Fail-stop: nothing after an fsync error is trusted; the operator restarts.
                settings.log("event=log_failed site=\(settings.site) error=\"\(error)\"")
                failStop()
                return
            }
            markStorageDone(id)
            retryBlockedAppends()  // the writer took a batch: there may be room now
            drainStorageQueue()
        case let .write(batch, resume): write([(batch, resume)])
        case let .snapshotFrame(peer, frame): snapshotFrame(peer, frame)
        case let .snapshotSent(peer): sendingSnapshot.remove(peer)
        case let .retryAppend(id, records):
            blockedAppends.insert((id, records), at: 0)
            retryBlockedAppends()
            drainStorageQueue()  // an append may have completed on this thread
        case let .snapshotTaken(installs, result): snapshotTaken(result, installsWhenStarted: installs)
        case let .read(request, resume): read(request, resume)
        case let .withStore(body): body(storage.store)
        }
    }

    /// Stops the site after a storage error: no more input is trusted until a restart
    /// recovers from disk. Peers see the connection close.
    private func failStop() {
        stoppedByFailure = true
        cond.withLock {
            running = false
            statusCache.failed = true
            leaseValidUntil = nil
        }
        transport.stop()
    }

    private func step(_ event: CoreEvent) {
        let ready = core.step(event, at: Self.clock(), entropy: rng.next())
        perform(ready)
    }

    // MARK: Carrying out a Ready

    private func perform(_ ready: Ready) {
        do {
            if let h = ready.hardState {
                try saveHardState(h)
                // The vote it now holds for this term is durable: the site may vote again.
                if !core.abstaining, access(Self.rejoiningPath(settings.dataDirectory), F_OK) == 0 {
                    try Durable.unlink(Self.rejoiningPath(settings.dataDirectory))
                    settings.log("event=rejoined site=\(settings.site) term=\(h.term) primary=\(h.votedFor?.name ?? "?")")
                }
            }
            if let t = ready.truncateAfter {
                dropBlockedAppends(after: t)
                try storage.truncate(after: t)
            }
        } catch {
            settings.log("event=storage_failed site=\(settings.site) error=\"\(error)\"")
            failStop()
            return
        }
        if ready.roleChanges.contains(where: { if case .becamePrimary = $0 { return true } else { return false } }) {
            catchUpStoreAsPrimary(noop: ready.append)
        }
        // Messages that need nothing durable go first: a primary's appends reach the peers
        // while its own fsync runs (which may run on this thread, below).
        for m in ready.messages { transport.send(m) }
        if ready.hasStorageWork, let id = ready.storageID {
            storageQueue.append((id, ready.messagesAfterPersist, ready.append.isEmpty))
            if !ready.append.isEmpty { appendToLog(id, ready.append) }
        } else {
            for m in ready.messagesAfterPersist { transport.send(m) }
        }
        for change in ready.roleChanges { roleChanged(change) }
        if let c = ready.committedThrough { committed(through: c) }
        for r in ready.logReads {
            // Older than the core's cache: read from the segments on disk.
            let records = (try? storage.log.read(from: r.from, maxBytes: r.maxBytes)) ?? []
            enqueue(.event(.logRead(peer: r.peer, records: records)))
        }
        for peer in ready.snapshotsNeeded { offerSnapshot(to: peer) }
        // Completions go to the core only after this whole Ready was carried out, in order.
        drainStorageQueue()
        applyCommitted()
    }

    /// Appends waiting for room in the log's queue, oldest first (loop thread only). A
    /// later append must not overtake one the log had no room for: the log takes records
    /// only in LSN order, and refuses a gap as an error.
    private var blockedAppends: [(id: UInt64, records: [LogRecord])] = []

    private func appendToLog(_ id: UInt64, _ records: [LogRecord]) {
        // Only this thread adds to the log's queue, so room seen here is room at the append.
        guard blockedAppends.isEmpty, storage.log.hasRoom(for: records) else {
            blockedAppends.append((id, records))
            return
        }
        submitToLog(id, records)
    }

    /// A truncation drops the records beyond it that still wait for room: they are no
    /// longer in the core's log. Their storage completions still come, in order (the
    /// core caps what each covers at the truncation point).
    private func dropBlockedAppends(after t: LSN) {
        for i in blockedAppends.indices { blockedAppends[i].records.removeAll { $0.lsn > t } }
        blockedAppends.removeAll { entry in
            guard entry.records.isEmpty else { return false }
            markStorageDone(entry.id)
            return true
        }
    }

    /// Hands the log what waited for room, oldest first, while there is room.
    private func retryBlockedAppends() {
        while let first = blockedAppends.first, storage.log.hasRoom(for: first.records) {
            blockedAppends.removeFirst()
            submitToLog(first.id, first.records)
        }
    }

    private func submitToLog(_ id: UInt64, _ records: [LogRecord]) {
        // With no other input waiting, this thread writes and fsyncs the records itself
        // (two thread hand-offs fewer on a replica's acknowledgement path); with input
        // waiting, the log's writer takes them, so that the next inputs' records can join
        // them in one group commit instead of each paying an fsync on this thread.
        let idle = inputsWaiting == 0 && cond.withLock { inbox.isEmpty }
        let completion: @Sendable (Result<LSN, WALError>) -> Void = { [weak self] result in
            if case .failure(.queueFull) = result {
                // Back-pressure from the log, not a failure (not expected: the loop looks
                // for room first): it waits at the head of the blocked appends.
                self?.enqueue(.retryAppend(id, records))
                return
            }
            self?.enqueue(.walDone(id, result))
        }
        if idle {
            storage.log.appendInline(records, completion: completion)
            // Usually the append ran on this thread and its completion is now the inbox's
            // last input: take it at once, so the acknowledgement it releases goes out at
            // the end of this Ready (before the follower's apply) rather than after the
            // inputs queued ahead of it (a completion may come to the core at any point
            // after the fsync returned).
            let done: Bool = cond.withLock {
                guard let last = inbox.last, case let .walDone(doneID, .success) = last, doneID == id else { return false }
                inbox.removeLast()
                return true
            }
            if done { markStorageDone(id) }
        } else {
            storage.log.append(records, completion: completion)
        }
    }

    /// Notes that storage work `id` is done; `drainStorageQueue` reports it in its turn.
    private func markStorageDone(_ id: UInt64) {
        if let i = storageQueue.firstIndex(where: { $0.id == id }) { storageQueue[i].done = true }
    }

    /// Storage completions are reported to the core in order, each once it and everything
    /// before it is durable.
    private func drainStorageQueue() {
        while let first = storageQueue.first, first.done {
            storageQueue.removeFirst()
            for m in first.after { transport.send(m) }
            step(.persisted(storageID: first.id))
        }
        retryPrimaryCatchUp()
    }

    private func committed(through lsn: LSN) {
        if core.role == .primary {
            storage.store.markCommitted(through: lsn)
            // Keys first, then removals: removing while iterating the dictionary itself
            // copied all of it (the iteration holds its storage) at every commit.
            var due: [LSN] = []
            for l in waiters.keys where l <= lsn { due.append(l) }
            due.sort()
            for l in due {
                if let w = waiters.removeValue(forKey: l) { w.resume(.success(w.execution)) }
            }
            resolveOrphans(committedThrough: lsn)
            releaseReads()
        } else {
            // Applied once the Ready is carried out (`applyCommitted()`): its
            // acknowledgement must not wait for SQLite.
            applyDue = max(applyDue ?? lsn, lsn)
        }
    }

    /// Committed LSN a follower has still to apply to its database (loop thread only).
    private var applyDue: LSN?

    /// Applies what a follower learned was committed. Runs after the storage completions
    /// were drained, so a replica acknowledges an append (one fsync) before it spends
    /// time applying the earlier records that append's commit LSN released.
    private func applyCommitted() {
        guard let lsn = applyDue else { return }
        applyDue = nil
        // A site that became primary meanwhile has applied its whole log in its catch-up.
        guard core.role != .primary else { return }
        do { try storage.applyCommitted(through: lsn) } catch {
            settings.log("event=apply_failed site=\(settings.site) error=\"\(error)\"")
        }
        notePosition(lsn)
        resolveOrphans(committedThrough: lsn)
        releaseReads()
    }

    /// Tells the writers of a deposed primary what became of their writes.
    private func resolveOrphans(committedThrough lsn: LSN) {
        for (l, w) in orphans where l <= lsn {
            orphans[l] = nil
            switch core.log.term(at: l) {
            case w.term?: w.resume(.success(w.execution))
            case let other?:
                w.resume(.failure(.notCommitted("the record committed at LSN \(l) is of term \(other), not \(w.term)")))
            case nil:
                w.resume(.failure(.outcomeUnknown("LSN \(l) is no longer in this site's log")))
            }
        }
    }

    // MARK: Reads

    /// What this site's reads may show: its database, but on a primary only what committed.
    private var visibleLSN: LSN { min(storage.store.appliedLSN, core.commitLSN) }

    private func read(_ request: ReadRequest, _ resume: @escaping @Sendable (Result<QueryResult, ReadError>) -> Void) {
        let now = Self.clock()
        if request.consistency == .linearizable {
            // The lease proves no other site can have committed anything newer right now.
            guard core.canServeLeaseRead(at: now), primaryCatchUp == nil else {
                resume(.failure(.notPrimary(core.primaryID == settings.site ? nil : core.primaryID)))
                return
            }
            serve(request, resume)
            return
        }
        nextReadID += 1
        switch readGate.wait(nextReadID, minLSN: request.minLSN, appliedLSN: visibleLSN, deadline: request.deadline) {
        case .ready: serve(request, resume)
        case .waiting: gatedReads[nextReadID] = (request, resume)
        case let .refused(limit): resume(.failure(.tooManyWaiting(limit: limit)))
        }
    }

    /// Runs the query now. A primary's database also holds records executed but not yet
    /// committed: the answer waits until they commit, so a read never shows a write that
    /// could still be lost.
    private func serve(_ request: ReadRequest, _ resume: @escaping @Sendable (Result<QueryResult, ReadError>) -> Void) {
        let result: QueryResult
        do { result = try storage.store.query(request.statement) } catch {
            resume(.failure(.store(error)))
            return
        }
        if result.appliedLSN <= core.commitLSN {
            resume(.success(result))
        } else if commitWaits.count >= settings.maxWaitingReads {
            resume(.failure(.tooManyWaiting(limit: settings.maxWaitingReads)))
        } else {
            commitWaits.append((result.appliedLSN, core.hardState.term, request.deadline, result, resume))
        }
    }

    private func releaseReads() {
        for id in readGate.applied(visibleLSN) {
            if let r = gatedReads.removeValue(forKey: id) { serve(r.request, r.resume) }
        }
        let commit = core.commitLSN
        let term = core.hardState.term
        commitWaits.removeAll { w in
            if w.term != term || core.role != .primary {
                w.resume(.failure(.notPrimary(core.primaryID == settings.site ? nil : core.primaryID)))
                return true
            }
            guard w.lsn <= commit else { return false }
            w.resume(.success(w.result))
            return true
        }
    }

    private func expireReads(_ now: UInt64) {
        for id in readGate.expire(now: now) {
            if let r = gatedReads.removeValue(forKey: id) {
                r.resume(.failure(.timedOut(waitingFor: r.request.minLSN, applied: visibleLSN)))
            }
        }
        commitWaits.removeAll { w in
            guard now >= w.deadline else { return false }
            w.resume(.failure(.timedOut(waitingFor: w.lsn, applied: core.commitLSN)))
            return true
        }
        for (l, w) in orphans where now >= w.deadline {
            orphans[l] = nil
            w.resume(.failure(.outcomeUnknown("the primary stepped down before the write committed, and no record committed at LSN \(l) since")))
        }
        // A forward waits on its peer while it is the primary this site follows, or while it
        // still speaks (a switchover: it answers once it learns its writes' fate); a peer
        // silent for a lease that is not the live primary (paused, cut off) will not answer.
        let following = core.role == .follower && now < core.promiseUntil ? core.primaryID : nil
        let silence = UInt64(settings.config.timing.leaseDuration)
        expireForwards(now) { peer in
            peer != following && now - min(now, self.lastHeard[peer] ?? 0) > silence
        }
    }

    // MARK: Lag

    /// Remembers when a position was reached (sampled, bounded), for lag in time.
    private func notePosition(_ lsn: LSN) {
        let now = Self.clock()
        if let last = positionTimes.last, last.lsn >= lsn { return }
        if positionTimes.count >= 8_192 {
            // Keep every other sample: the history stays bounded and gets coarser.
            positionTimes = positionTimes.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
        }
        positionTimes.append((lsn, now))
    }

    /// When the first record after `lsn` was noted (nil: nothing after it).
    private func notedTime(after lsn: LSN) -> Instant? {
        var lo = 0, hi = positionTimes.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if positionTimes[mid].lsn <= lsn { lo = mid + 1 } else { hi = mid }
        }
        return lo < positionTimes.count ? positionTimes[lo].at : nil
    }

    private func lagNanoseconds(_ now: Instant) -> UInt64 {
        guard core.role != .primary else { return 0 }
        // In step: this site holds all its live primary has committed. The lag in time is
        // how long ago that last held (it keeps growing while no primary is heard).
        let live = core.primaryID != nil && now < core.promiseUntil
        if caughtUpAt == 0 || (live && storage.store.appliedLSN >= core.primaryCommitLSN) { caughtUpAt = now }
        return now - min(now, caughtUpAt)
    }

    private func peerViews(_ now: Instant) -> [SiteID: SiteStatus.PeerView] {
        guard core.role == .primary else { return [:] }
        var out: [SiteID: SiteStatus.PeerView] = [:]
        for site in settings.config.sites where site.id != settings.site {
            guard let p = core.peerState(site.id) else { continue }
            let behind = p.match < core.log.lastLSN
            let since = behind ? notedTime(after: p.match).map { now - min(now, $0) } ?? 0 : 0
            out[site.id] = SiteStatus.PeerView(matchLSN: p.match, sinceContactNanoseconds: now - min(now, p.lastContact),
                                               lagNanoseconds: since)
        }
        return out
    }

    private func roleChanged(_ change: RoleChange) {
        settings.log("event=role_change site=\(settings.site) change=\"\(change)\"")
        settings.onRoleChange(change)
        guard case let .steppedDown(term, reason) = change else { return }
        // Undo what this site executed but never committed; the new primary's log decides.
        // The log decides what became of writes not yet committed (see `orphans`).
        let deadline = Self.clock() + Self.orphanWaitNanoseconds
        for (l, w) in waiters { orphans[l] = (w.term, w.resume, w.execution, deadline) }
        waiters = [:]
        settings.log("event=writes_pending_outcome site=\(settings.site) count=\(orphans.count) reason=\"stepped down in term \(term): \(reason)\"")
        for w in commitWaits { w.resume(.failure(.notPrimary(nil))) }
        commitWaits = []
        do {
            if storage.store.appliedLSN > core.commitLSN { try storage.store.rollback(to: core.commitLSN) }
        } catch {
            do { try storage.rebuild(through: min(core.commitLSN, storage.log.lastLSN)) } catch {
                settings.log("event=rebuild_failed site=\(settings.site) error=\"\(error)\"")
            }
        }
    }

    /// A new primary's database must reflect its whole log before it executes writes at
    /// the next LSN: the tail it holds from earlier terms (uncommitted until its no-op
    /// commits) and the no-op itself are applied, undoably.
    private func catchUpStoreAsPrimary(noop: [LogRecord]) {
        primaryCatchUp = noop
        retryPrimaryCatchUp()
    }

    /// Applies the new primary's tail once the records are durable (the log reads only
    /// durable records); until then no write is taken.
    private func retryPrimaryCatchUp() {
        guard let noop = primaryCatchUp else { return }
        guard core.role == .primary else {
            primaryCatchUp = nil
            return
        }
        let tailEnd = noop.first?.lsn.previous ?? core.log.lastLSN
        guard storage.log.lastLSN >= tailEnd else { return }
        do {
            let store = storage.store
            var records: [LogRecord] = []
            var from = store.appliedLSN.next
            while from <= tailEnd {
                let chunk = try storage.log.read(from: from, maxBytes: 4 << 20).filter { $0.lsn <= tailEnd }
                guard let last = chunk.last else { break }
                records.append(contentsOf: chunk)
                from = last.lsn.next
            }
            records.append(contentsOf: noop.filter { $0.lsn > store.appliedLSN })
            try store.applySpeculatively(records.filter { $0.lsn > store.appliedLSN })
            primaryCatchUp = nil
        } catch {
            settings.log("event=primary_catch_up_failed site=\(settings.site) error=\"\(error)\"")
            failStop()
        }
    }

    // MARK: Writes

    /// At most this many writes are proposed as one group (a bound on one Ready's size;
    /// the core splits what goes to a peer by `max_message_bytes` anyway).
    static let maxWritesPerProposal = 256

    /// Executes `group` in order at consecutive LSNs and proposes the records of those that
    /// succeeded as one group. A write whose statements fail is answered at once and takes
    /// no LSN; a refused proposal undoes the whole group in the store. Returns how many
    /// writes it dealt with (answered, or proposed and waiting): all, or a prefix when the
    /// store cut the group short at its time limit.
    @discardableResult
    private func write(_ group: [(WriteBatch, @Sendable (Result<Execution, WriteError>) -> Void)]) -> Int {
        guard core.isAcceptingProposals, core.role == .primary, primaryCatchUp == nil else {
            let error = WriteError.notPrimary(core.primaryID == settings.site ? nil : core.primaryID)
            for (_, resume) in group { resume(.failure(error)) }
            return group.count
        }
        // What the core would refuse is refused before anything is executed; a group larger
        // than the room left under the uncommitted limit is cut to that room.
        let room = core.uncommittedRoom
        if let refusal = core.proposalRefusal(count: min(group.count, max(1, room)), at: Self.clock()) {
            for (_, resume) in group { resume(.failure(.refused(refusal))) }
            return group.count
        }
        let writes = Array(group.prefix(room))
        let first = core.nextLSN
        let term = core.hardState.term
        // One SQLite transaction for the group; a write that fails takes no LSN.
        var executed: [(Execution, @Sendable (Result<Execution, WriteError>) -> Void)] = []
        let results = storage.store.execute(group: writes.map(\.0), from: first, term: term)
        // Writes past the store's cut (it ran out of time) go back to the loop, in front of
        // what followed them; when there is no cut, those beyond the room are refused.
        let dealtWith: Int
        if results.count < writes.count {
            dealtWith = results.count
        } else {
            dealtWith = group.count
            for (_, resume) in group.dropFirst(room) {
                resume(.failure(.refused(.tooManyUncommitted(limit: settings.config.limits.maxUncommittedRecords))))
            }
        }
        for ((_, resume), result) in zip(writes, results) {
            switch result {
            case let .success(execution): executed.append((execution, resume))
            case let .failure(error): resume(.failure(.store(error)))
            }
        }
        guard !executed.isEmpty else { return dealtWith }
        do {
            let (proposed, ready) = try core.propose(executed.map { ($0.0.record.kind, $0.0.record.payload) }, at: Self.clock())
            precondition(proposed == first, "the core numbered the records differently from the store")
            settings.onProposal(executed.count)
            for (k, (execution, resume)) in executed.enumerated() {
                let lsn = LSN(first.rawValue + UInt64(k))
                waiters[lsn] = (term, resume, execution)
                notePosition(lsn)
            }
            perform(ready)
            return dealtWith
        } catch {
            // Rare: the lease ran out while the group executed. The store must not stay
            // ahead of the log; a schema record cannot be undone in place, and then this
            // site stops (a restart or rebuild brings it back in line).
            do { try storage.store.rollback(to: first.previous) } catch let undo {
                settings.log("event=store_ahead_of_log site=\(settings.site) lsn=\(first) error=\"\(undo)\"")
                for (_, resume) in executed { resume(.failure(.refused(error))) }
                failStop()
                return dealtWith
            }
            for (_, resume) in executed { resume(.failure(.refused(error))) }
            return dealtWith
        }
    }

    /// A new primary whose database is at an older schema version proposes the missing
    /// migrations, once per term (after its catch-up, so it sees what its log holds).
    private func maybeMigrateSchema() {
        guard core.role == .primary, core.isAcceptingProposals, primaryCatchUp == nil, migratedInTerm != core.hardState.term,
              let target = settings.schemaMigrations.last?.schemaVersion, storage.store.schemaVersion < target
        else { return }
        migratedInTerm = core.hardState.term
        let site = settings.site
        let log = settings.log
        for m in settings.schemaMigrations where m.schemaVersion > storage.store.schemaVersion {
            write([(m, { @Sendable result in
                switch result {
                case let .success(e): log("event=schema_migrated site=\(site) version=\(m.schemaVersion) lsn=\(e.record.lsn)")
                case let .failure(e): log("event=schema_migration_failed site=\(site) version=\(m.schemaVersion) error=\"\(e)\"")
                }
            })])
        }
    }

    // MARK: Snapshots

    /// Takes a local snapshot on a thread of its own (copying and compressing a large
    /// database must not stop this loop's heartbeats), then removes the log it covers.
    private func maybeSnapshot() {
        guard settings.snapshotEveryRecords > 0, !snapshotInProgress, settings.config.site(settings.site)?.role == .voter else { return }
        let applied = min(storage.store.appliedLSN, core.commitLSN)
        guard applied.rawValue >= lastSnapshotLSN.rawValue + UInt64(settings.snapshotEveryRecords) else { return }
        // Only now, and then every eighth of the record count, the sizes (a stat of the
        // database file): the count may pass long before the log is large enough.
        if settings.snapshotLogFraction > 0 {
            guard applied >= nextSnapshotSizeCheck else { return }
            nextSnapshotSizeCheck = LSN(applied.rawValue + UInt64(max(1, settings.snapshotEveryRecords / 8)))
        }
        // A truncated tail is not a log written: the baseline follows a log that shrank.
        let logBytes = storage.log.byteSize
        logBytesAtLastSnapshot = min(logBytesAtLastSnapshot, logBytes)
        guard Self.snapshotDue(loggedBytes: logBytes - logBytesAtLastSnapshot,
                               databaseBytes: storage.store.databaseFileBytes,
                               logFraction: settings.snapshotLogFraction) else { return }
        snapshotInProgress = true
        let installs = snapshotsInstalled
        let source = storage.store.snapshotSource
        let path = storage.snapshotPath
        snapshotStarted = Self.clock()
        Thread { [weak self] in
            nameCurrentThread("snapshot-take")
            // Written beside its place; the loop puts it there (`snapshotTaken`), so that a
            // snapshot installed from a peer meanwhile is never replaced by this older one.
            let result = Result { try SiteStorage.prepareSnapshot(source, for: path) }
            self?.enqueue(.snapshotTaken(installs: installs, result.mapError { SnapshotFailure(message: "\($0)") }))
        }.start()
    }

    /// Whether the log written since the last snapshot is large enough, against the
    /// database's size, for another one (the record count was checked first): a snapshot
    /// copies the whole database, so copying costs at most 1 / `logFraction` bytes per
    /// byte logged (2 at 0.5), however large the database grows.
    static func snapshotDue(loggedBytes: Int, databaseBytes: Int, logFraction: Double) -> Bool {
        guard logFraction > 0 else { return true }
        return Double(max(0, loggedBytes)) >= logFraction * Double(max(0, databaseBytes))
    }

    private func snapshotTaken(_ result: Result<SiteStorage.PreparedSnapshot, SnapshotFailure>, installsWhenStarted: Int) {
        snapshotInProgress = false
        guard installsWhenStarted == snapshotsInstalled else {
            // A snapshot from a peer was installed while this one was taken: this one holds
            // the history before it (another one, if this site had diverged), and must
            // neither replace it nor decide what of the new log is removed.
            if case let .success(prepared) = result, let scratch = prepared.scratch { try? FileManager.default.removeItem(atPath: scratch) }
            settings.log("event=snapshot_discarded site=\(settings.site) reason=\"a snapshot was installed meanwhile\"")
            return
        }
        let placed = result.flatMap { prepared in
            Result { try SiteStorage.placeSnapshot(prepared, at: storage.snapshotPath) }.mapError { SnapshotFailure(message: "\($0)") }
        }
        switch placed {
        case let .success(info):
            lastSnapshotLSN = info.lsn
            do {
                try storage.log.removePrefix(through: info.lsn, retention: settings.retention)
                // Records logged while the snapshot was taken count towards the next one
                // only roughly (what remains of the log is the new baseline): a snapshot
                // comes a little later, never sooner.
                logBytesAtLastSnapshot = storage.log.byteSize
                step(.compacted(through: storage.log.firstLSN.previous))
                settings.log("event=snapshot site=\(settings.site) lsn=\(info.lsn) bytes=\(info.fileBytes) database_bytes=\(info.rawBytes) took_ms=\(Self.milliseconds(since: snapshotStarted)) log_first_lsn=\(storage.log.firstLSN)")
            } catch {
                settings.log("event=log_compaction_failed site=\(settings.site) error=\"\(error)\"")
            }
        case let .failure(error):
            let why = error.message
            // Retried after the next batch of records.
            lastSnapshotLSN = min(storage.store.appliedLSN, core.commitLSN)
            settings.log("event=snapshot_failed site=\(settings.site) error=\"\(why)\"")
        }
    }

    private func offerSnapshot(to peer: SiteID) {
        do {
            if !FileManager.default.fileExists(atPath: storage.snapshotPath) {
                // The snapshot thread is writing one (into the same scratch file): the
                // offer is repeated, and finds it in place then.
                guard !snapshotInProgress else { return }
                let info = try storage.takeSnapshot(retention: settings.retention)
                lastSnapshotLSN = info.lsn
                logBytesAtLastSnapshot = storage.log.byteSize
            }
            let (info, _) = try SnapshotFormat.readHeader(path: storage.snapshotPath)
            transport.send(.offer(lsn: info.lsn, term: info.term, size: UInt64(info.fileBytes)), to: peer)
            settings.log("event=snapshot_offered site=\(settings.site) peer=\(peer) lsn=\(info.lsn) bytes=\(info.fileBytes)")
        } catch {
            settings.log("event=snapshot_offer_failed site=\(settings.site) peer=\(peer) error=\"\(error)\"")
        }
    }

    private func snapshotFrame(_ peer: SiteID, _ frame: SnapshotFrame) {
        switch frame {
        case let .offer(lsn, term, size):
            // Only a site whose log does not reach the snapshot, or diverged from it (a
            // different term there: records lost in an async window), needs it; installing
            // one below a matching log's end would drop records this site acknowledged.
            let diverged = core.log.term(at: lsn).map { $0 != term } ?? false
            guard lsn > core.log.lastLSN || diverged, lsn > storage.store.appliedLSN || diverged, term <= core.hardState.term,
                  size >= 64, size < 1 << 40, peer == core.primaryID || core.primaryID == nil
            else { return }
            let path = storage.snapshotPath + ".incoming-\(lsn)-\(term)"
            // Partial files of other snapshots are obsolete.
            let dir = (storage.snapshotPath as NSString).deletingLastPathComponent
            for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            where name.contains(".incoming-") && dir + "/" + name != path {
                try? FileManager.default.removeItem(atPath: dir + "/" + name)
            }
            // Resume from what we already hold of this very snapshot. (A prefix damaged by
            // a crash is caught at install, which checks every chunk and the SHA-256.)
            let have = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0
            let offset = have <= size ? have : 0
            if offset == 0 { try? FileManager.default.removeItem(atPath: path) }
            snapshotReceive = (lsn, term, size, path, peer)
            snapshotReceiveStarted = Self.clock()
            settings.log("event=snapshot_receive site=\(settings.site) from=\(peer) lsn=\(lsn) bytes=\(size) resume_offset=\(offset)")
            if offset == size {
                finishSnapshot()
            } else {
                transport.send(.request(lsn: lsn, offset: offset), to: peer)
            }
        case let .request(lsn, offset):
            startSending(lsn: lsn, offset: offset, to: peer)
        case let .chunk(lsn, offset, bytes):
            guard let rx = snapshotReceive, rx.lsn == lsn, rx.peer == peer else { return }
            do {
                let fd = try FileDescriptor(path: rx.path, flags: O_WRONLY | O_CREAT)
                let size = UInt64(try fd.size())
                // Out of order (a duplicate after a reconnection): the next offer restarts it.
                guard size == offset, offset + UInt64(bytes.count) <= rx.size else { return }
                try fd.write(bytes, at: Int(offset))
                let done = offset + UInt64(bytes.count)
                if done == rx.size {
                    try fd.sync()
                    finishSnapshot()
                } else {
                    settings.log("event=snapshot_progress site=\(settings.site) lsn=\(lsn) received=\(done) of=\(rx.size)")
                }
            } catch {
                settings.log("event=snapshot_receive_failed site=\(settings.site) error=\"\(error)\"")
                snapshotReceive = nil
                try? FileManager.default.removeItem(atPath: rx.path)
            }
        }
    }

    /// Installs a completely received snapshot, after checking it is what was offered.
    private func finishSnapshot() {
        guard let rx = snapshotReceive else { return }
        snapshotReceive = nil
        do {
            let (header, _) = try SnapshotFormat.readHeader(path: rx.path)
            guard header.lsn == rx.lsn, header.term == rx.term, UInt64(header.fileBytes) == rx.size else {
                throw StoreError.snapshot("received snapshot holds LSN \(header.lsn) term \(header.term), \(header.fileBytes) bytes; offered \(rx.lsn) term \(rx.term), \(rx.size) bytes")
            }
            let diverged = core.log.term(at: rx.lsn).map { $0 != rx.term } ?? false
            guard rx.lsn > core.log.lastLSN || diverged else { return }  // the log caught up meanwhile
            let transferMs = Self.milliseconds(since: snapshotReceiveStarted)
            let installStarted = Self.clock()
            try storage.installSnapshot(from: rx.path) { _, _ in }
            snapshotsInstalled += 1
            try? FileManager.default.removeItem(atPath: rx.path)
            // Appends that waited for room in the log's queue hold records the reset log no
            // longer takes (at or below the snapshot's LSN, or above it from the log the
            // core just dropped): they go, their completions reported in order (the core
            // caps what each covers at the snapshot's LSN).
            dropBlockedAppends(after: .zero)
            lastSnapshotLSN = rx.lsn
            logBytesAtLastSnapshot = storage.log.byteSize
            step(.snapshotInstalled(lsn: rx.lsn, term: rx.term))
            settings.log("event=snapshot_installed site=\(settings.site) lsn=\(rx.lsn) bytes=\(rx.size) transfer_ms=\(transferMs) install_ms=\(Self.milliseconds(since: installStarted))")
        } catch {
            settings.log("event=snapshot_install_failed site=\(settings.site) error=\"\(error)\"")
            try? FileManager.default.removeItem(atPath: rx.path)
            if storage.installInterrupted {
                // Past the point of no return (the database or the log may already be the
                // snapshot's): only a restart, whose open finishes the install, is safe.
                settings.log("event=storage_failed site=\(settings.site) error=\"a snapshot install stopped midway; restart to finish it\"")
                failStop()
            }
        }
    }

    /// Streams the local snapshot file from `offset` on a thread of its own, waiting
    /// while the peer's queue is full.
    private func startSending(lsn: LSN, offset: UInt64, to peer: SiteID) {
        guard !sendingSnapshot.contains(peer) else { return }
        // Open first: a newer snapshot renamed into place later does not change this file.
        guard let fd = try? FileDescriptor(path: storage.snapshotPath, flags: O_RDONLY), let size = try? fd.size(),
              let head = try? fd.read(count: 64, at: 0),
              let (info, _) = try? SnapshotFormat.decodeHeader(head, fileBytes: size, path: storage.snapshotPath),
              info.lsn == lsn, offset <= UInt64(size)
        else { return }
        sendingSnapshot.insert(peer)
        let transport = self.transport
        let log = settings.log
        let site = settings.site
        let pause = settings.snapshotChunkPauseMicroseconds
        let chunkBytes = max(1, min(settings.snapshotChunkBytes, Wire.snapshotChunkBytes))
        Thread { [weak self] in
            nameCurrentThread("snapshot-send")
            defer { self?.enqueue(.snapshotSent(peer)) }
            var at = Int(offset)
            while at < size {
                guard let bytes = try? fd.read(count: min(chunkBytes, size - at), at: at), !bytes.isEmpty else { return }
                var tries = 0
                // Leave room in the peer's queue for heartbeats and appends.
                while transport.queuedBytes(to: peer) > 4 * chunkBytes + (1 << 20)
                    || !transport.send(.chunk(lsn: lsn, offset: UInt64(at), bytes: bytes), to: peer) {
                    tries += 1
                    if tries > 20_000 || !transport.connectedPeers.contains(peer) {
                        log("event=snapshot_send_interrupted site=\(site) peer=\(peer) sent=\(at) of=\(size)")
                        return
                    }
                    usleep(500)
                }
                at += bytes.count
                if pause > 0 { usleep(pause) }
            }
            log("event=snapshot_sent site=\(site) peer=\(peer) lsn=\(lsn) bytes=\(size)")
        }.start()
    }
}

/// A local snapshot that could not be taken (it is retried later).
struct SnapshotFailure: Error, Sendable {
    let message: String
}
