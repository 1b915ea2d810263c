import Foundation
import TandemCore
import TandemModel

/// Events of the simulation.
enum SimEvent: Sendable {
    case deliver(Message)
    case tick(site: SiteID, epoch: Int)
    case storageDone(site: SiteID, epoch: Int)
    case logRead(site: SiteID, epoch: Int, peer: SiteID, records: [LogRecord])
    case snapshotArrives(site: SiteID, epoch: Int, lsn: LSN, term: Term, hash: UInt64)
    case fault(Scenario.Action)
    case resume(site: SiteID, epoch: Int)
    case flap(a: SiteID, b: SiteID, down: Bool, period: VirtualTime, until: VirtualTime)
    case clientWrite
    case clientRead
    case retryWrite(id: Int)
    case sample
}

/// How one run went.
public struct SimulationResult: Sendable {
    public struct Violation: Sendable {
        public var timeSeconds: Double
        public var invariant: String
        public var detail: String
    }

    public struct Failover: Sendable {
        /// When no site held a valid lease any more, and when one did again.
        public var fromSeconds: Double
        public var toSeconds: Double
        public var newPrimary: String
        public var term: UInt64
        public var recoverySeconds: Double { toSeconds - fromSeconds }
    }

    public struct Lane: Sendable {
        public var site: String
        /// (start seconds, state) with state one of primary, follower, candidate, down, paused.
        public var states: [(Double, String)]
    }

    public var scenario: String
    public var seed: UInt64
    public var virtualSeconds: Double
    public var wallSeconds: Double
    public var events: Int
    public var violations: [Violation]
    public var trace: [String]
    public var timeline: [(Double, String)]
    public var failovers: [Failover]
    public var writesProposed: Int
    public var writesAcknowledged: Int
    public var writesFailed: Int
    public var writesLost: Int
    public var linearizableReads: Int
    public var finalAppliedLSN: [String: UInt64]
    public var finalCommitLSN: UInt64
    public var lanes: [Lane]
    /// The largest lag each voter showed during the run (sampled every 100 ms).
    public var maxLagRecords: [String: UInt64]
    public var commitProgress: [(Double, UInt64)]
    public var faultMarks: [(Double, String)]

    public var passed: Bool { violations.isEmpty }
    public var speedup: Double { wallSeconds > 0 ? virtualSeconds / wallSeconds : .infinity }
}

/// Runs one scenario from one seed, deterministically: the same scenario, seed and code
/// replay the same run exactly.
public struct Simulator {
    public let scenario: Scenario
    public let seed: UInt64
    public var flaw: Core.TestingFlaw?
    /// How many trace lines to keep (the last ones are printed with a violation).
    public var traceLimit = 400
    /// Put every message delivered into the trace too.
    public var traceMessages = false

    public init(scenario: Scenario, seed: UInt64, flaw: Core.TestingFlaw? = nil) {
        self.scenario = scenario
        self.seed = seed
        self.flaw = flaw
    }

    public func run() -> SimulationResult {
        var world = World(scenario: scenario, seed: seed, flaw: flaw, traceLimit: traceLimit)
        world.traceMessages = traceMessages
        return world.run()
    }
}

/// The state of one run.
struct World {
    let scenario: Scenario
    let seed: UInt64
    let config: ClusterConfig
    let flaw: Core.TestingFlaw?
    let traceLimit: Int
    var traceMessages = false
    var rng: SeededRandom
    var queue = EventQueue<SimEvent>()
    var now: VirtualTime = 0
    var sites: [SiteID: SimulatedSite] = [:]
    var order: [SiteID] = []
    var checker: Checker
    var events = 0

    // Network.
    var blocked: Set<String> = []  // "from>to"
    let latencies: [SiteID: [SiteID: Double]]
    var loss: Double

    // Workload.
    var workloadOn = true
    var nextWriteID = 0
    var waiting: [Int: VirtualTime] = [:]  // write id → first attempt
    var proposed = 0
    var acknowledgedCount = 0
    var highestAcknowledged = LSN.zero
    var reads = 0
    var failed = 0

    // Reporting.
    var trace: [String] = []
    var timeline: [(Double, String)] = []
    var failovers: [SimulationResult.Failover] = []
    var noLeaseSince: VirtualTime? = 0
    var lastHolder: SiteID?
    var lanes: [SiteID: [(Double, String)]] = [:]
    var commitProgress: [(Double, UInt64)] = []
    /// Largest lag (records behind the commit LSN) seen per running voter.
    var maxLag: [String: UInt64] = [:]
    var faultMarks: [(Double, String)] = []
    var lastHealTime: VirtualTime = 0
    var primaryAfterHeal = false

    static let tickInterval: VirtualTime = 10_000_000  // 10 ms
    static let settleSeconds = 4.0

    init(scenario: Scenario, seed: UInt64, flaw: Core.TestingFlaw?, traceLimit: Int) {
        self.scenario = scenario
        self.seed = seed
        self.flaw = flaw
        self.traceLimit = traceLimit
        config = scenario.clusterConfig
        latencies = Self.latencyTable(scenario)
        rng = SeededRandom(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ 1)
        loss = scenario.network.loss
        var isAsync = false
        if case .async = scenario.commitPolicy { isAsync = true }
        checker = Checker(allowLeaseOverlap: scenario.expect.allowLeaseOverlap, asyncPolicy: isAsync)
        for spec in scenario.sites {
            let d = SiteDescriptor(id: SiteID(spec.id), domain: FailureDomain(spec.domain), role: spec.role)
            // Clocks start at unrelated values, as monotonic clocks of different machines do.
            let offset = Double(rng.next() % 1_000_000_000_000)
            sites[d.id] = SimulatedSite(descriptor: d, driftPPM: spec.clockDriftPPM, clockOffset: offset, fsyncMS: scenario.disk.fsyncMS)
            order.append(d.id)
        }
    }

    var seconds: Double { Double(now) / 1e9 }

    mutating func note(_ s: String) {
        trace.append(String(format: "%9.3fs ", seconds) + s)
        if trace.count > traceLimit * 2 { trace.removeFirst(trace.count - traceLimit) }
    }

    mutating func mark(_ s: String) {
        timeline.append((seconds, s))
        note(s)
    }

    mutating func lane(_ site: SiteID, _ state: String) {
        if lanes[site]?.last?.1 != state { lanes[site, default: []].append((seconds, state)) }
    }

    // MARK: Run

    mutating func run() -> SimulationResult {
        let wallStart = monotonicNanoseconds()
        for id in order { start(id) }
        for f in scenario.faults { queue.push(VirtualTime(f.atSeconds * 1e9), .fault(f.action)) }
        if scenario.workload.writesPerSecond > 0 {
            scheduleNextWrite()
            scheduleNextRead()
        }
        queue.push(0, .sample)
        let end = VirtualTime(scenario.durationSeconds * 1e9)
        let stopWrites = VirtualTime(max(0, scenario.durationSeconds - Self.settleSeconds) * 1e9)
        while let (t, event) = queue.pop(), t <= end {
            now = t
            if workloadOn && now >= stopWrites { workloadOn = false }
            events += 1
            handle(event)
        }
        now = end
        finish()
        let wall = Double(monotonicNanoseconds() - wallStart) / 1e9
        return result(wall: wall)
    }

    mutating func start(_ id: SiteID) {
        guard let s = sites[id] else { return }
        s.up = true
        let local = s.localTime(now)
        do {
            var view = s.disk.view
            // A snapshot may already cover part of the log.
            if s.disk.records.isEmpty && s.disk.firstLSN.previous > .zero {
                view = LogView(after: s.disk.firstLSN.previous, term: s.disk.previousTerm)
            }
            s.core = try Core(id: id, config: config, hardState: s.diskHardState, log: view, commitLSN: s.appliedLSN,
                              now: local, entropy: rng.next(), flaw: flaw, abstaining: s.rejoining)
            if let core = s.core { s.remember(core) }
        } catch {
            checker.fail(now, "config", "\(error)")
            return
        }
        s.log = s.disk
        lane(id, s.descriptor.role == .witness ? "witness" : "follower")
        queue.push(now + Self.tickInterval, .tick(site: id, epoch: s.epoch))
    }

    // MARK: Events

    mutating func handle(_ event: SimEvent) {
        switch event {
        case let .deliver(m):
            guard let s = sites[m.to], s.up, s.core != nil else { return }
            if s.pausedUntil != nil { s.deferred.append(event); return }
            if isBlocked(m.from, m.to) { return }
            if traceMessages { note("deliver " + m.description) }
            step(s, .message(m))
        case let .tick(id, epoch):
            guard let s = sites[id], s.epoch == epoch, s.up else { return }
            queue.push(now + Self.tickInterval, .tick(site: id, epoch: epoch))
            if s.pausedUntil != nil { return }
            step(s, .tick)
            compactIfDue(s)
        case let .storageDone(id, epoch):
            guard let s = sites[id], s.epoch == epoch, s.up else { return }
            if s.pausedUntil != nil { s.deferred.append(event); return }
            completeStorage(s)
        case let .logRead(id, epoch, peer, records):
            guard let s = sites[id], s.epoch == epoch, s.isRunning else { return }
            step(s, .logRead(peer: peer, records: records))
        case let .snapshotArrives(id, epoch, lsn, term, hash):
            guard let s = sites[id], s.epoch == epoch, s.isRunning else { return }
            installSnapshot(s, lsn: lsn, term: term, hash: hash)
        case let .fault(action):
            fault(action)
        case let .resume(id, epoch):
            guard let s = sites[id], s.epoch == epoch, s.pausedUntil != nil else { return }
            s.pausedUntil = nil
            lane(id, laneState(s))
            mark("\(id) resumes")
            let replay = s.deferred
            s.deferred = []
            for e in replay { handle(e) }
        case let .flap(a, b, down, period, until):
            setLink(a, b, down: down)
            if now + period <= until {
                queue.push(now + period, .flap(a: a, b: b, down: !down, period: period, until: until))
            } else {
                setLink(a, b, down: false)
            }
        case .clientRead:
            if workloadOn { linearizableRead() }
            scheduleNextRead()
        case .clientWrite:
            if workloadOn {
                nextWriteID += 1
                waiting[nextWriteID] = now
                attemptWrite(nextWriteID)
            }
            scheduleNextWrite()
        case let .retryWrite(id):
            attemptWrite(id)
        case .sample:
            let commit = sites.values.filter(\.up).map(\.commitLSN.rawValue).max() ?? 0
            commitProgress.append((seconds, commit))
            for id in order {
                guard let s = sites[id], s.up, s.descriptor.role == .voter else { continue }
                let lag = commit > s.appliedLSN.rawValue ? commit - s.appliedLSN.rawValue : 0
                maxLag[id.name] = max(maxLag[id.name] ?? 0, lag)
            }
            queue.push(now + 100_000_000, .sample)
        }
    }

    /// Feeds an input to a site's core and carries out its Ready.
    mutating func step(_ s: SimulatedSite, _ event: CoreEvent) {
        // Take the core out while it runs, so its arrays stay uniquely referenced and are
        // mutated in place instead of copied.
        guard var core = s.core.take() else { return }
        let roleBefore = core.role
        let ready = core.step(event, at: s.localTime(now), entropy: rng.next())
        s.remember(core)
        s.core = core
        perform(s, ready)
        if roleBefore != core.role || !ready.roleChanges.isEmpty { lane(s.id, laneState(s)) }
        // A lease only starts inside a step of its holder, so checking after every step
        // sees every overlap.
        checkLeases()
    }

    mutating func perform(_ s: SimulatedSite, _ ready: Ready) {
        if ready.hasStorageWork, let storageID = ready.storageID {
            if let t = ready.truncateAfter { s.log.truncate(after: t) }
            s.log.append(ready.append)
            s.pending.append(PendingStorage(storageID: storageID, hardState: ready.hardState, truncateAfter: ready.truncateAfter,
                                            append: ready.append, messagesAfterPersist: ready.messagesAfterPersist))
            startSync(s)
        } else {
            for m in ready.messagesAfterPersist { send(m) }
        }
        for m in ready.messages { send(m) }
        for change in ready.roleChanges { roleChanged(s, change) }
        if let through = ready.committedThrough { applyCommitted(s, through: through) }
        for r in ready.logReads {
            let records = s.disk.records.filter { $0.lsn >= r.from }.prefix(256)
            queue.push(now + 200_000, .logRead(site: s.id, epoch: s.epoch, peer: r.peer, records: Array(records)))
        }
        for peer in ready.snapshotsNeeded { sendSnapshot(from: s, to: peer) }
    }

    /// Group commit, as the log does it: one fsync at a time covers everything submitted
    /// before it started.
    mutating func startSync(_ s: SimulatedSite) {
        guard s.syncCovering == 0, !s.pending.isEmpty, !s.diskFull else { return }
        s.syncCovering = s.pending.count
        let jitter = scenario.disk.fsyncJitterMS > 0 ? Double(rng.next() % 1000) / 1000 * scenario.disk.fsyncJitterMS : 0
        queue.push(now + VirtualTime((s.fsyncMS + jitter) * 1e6), .storageDone(site: s.id, epoch: s.epoch))
    }

    mutating func completeStorage(_ s: SimulatedSite) {
        guard s.syncCovering > 0 else { return }
        if s.fsyncFails {
            // Fail-stop: the process exits on an fsync error; what was not synced is lost.
            mark("\(s.id): fsync error, the site stops (fail-stop)")
            crash(s)
            return
        }
        let done = s.pending.prefix(s.syncCovering)
        s.pending.removeFirst(s.syncCovering)
        s.syncCovering = 0
        for p in done {
            if let h = p.hardState {
                s.diskHardState = h
                checker.persistedTerm(now, site: s.id, term: h.term)
                // Its vote in the term of the primary it heard is durable: it may vote again.
                if s.rejoining, s.core?.abstaining == false, h.votedFor != nil { s.rejoining = false }
            }
            if let t = p.truncateAfter { s.disk.truncate(after: t) }
            s.disk.append(p.append)
            for m in p.messagesAfterPersist { send(m) }
        }
        if let last = done.last { step(s, .persisted(storageID: last.storageID)) }
        startSync(s)
    }

    mutating func applyCommitted(_ s: SimulatedSite, through: LSN) {
        guard s.descriptor.role == .voter else { return }
        var lsn = s.appliedLSN.next
        while lsn <= through, let r = s.log.record(at: lsn) {
            s.apply(r)
            checker.applied(now, site: s.id, record: r, hash: s.stateHash)
            if let writeID = s.proposals.removeValue(forKey: lsn), s.role == .primary {
                acknowledge(writeID, record: r)
            }
            lsn = lsn.next
        }
    }

    mutating func roleChanged(_ s: SimulatedSite, _ change: RoleChange) {
        switch change {
        case let .becamePrimary(term):
            mark("\(s.id) becomes primary (term \(term))")
            lane(s.id, "primary")
            if let core = s.core { checker.becamePrimary(now, site: s.id, term: term, log: core.log) }
        case let .steppedDown(term, reason):
            mark("\(s.id) steps down in term \(term): \(reason)")
            lane(s.id, "follower")
            // Proposals it had not committed get no answer from it.
            s.proposals = [:]
        case let .lostMajority(term): note("\(s.id) lost the majority (term \(term))")
        case let .regainedMajority(term): note("\(s.id) regained the majority (term \(term))")
        case let .switchoverStarted(to): mark("\(s.id) starts a switchover to \(to)")
        case let .switchoverAborted(to, reason): mark("\(s.id) aborts the switchover to \(to): \(reason)")
        }
    }

    // MARK: Network

    func key(_ a: SiteID, _ b: SiteID) -> String { a.name + ">" + b.name }
    func isBlocked(_ a: SiteID, _ b: SiteID) -> Bool { !blocked.isEmpty && blocked.contains(key(a, b)) }

    mutating func setLink(_ a: SiteID, _ b: SiteID, down: Bool) {
        if down {
            blocked.insert(key(a, b))
            blocked.insert(key(b, a))
        } else {
            blocked.remove(key(a, b))
            blocked.remove(key(b, a))
        }
    }

    func latency(_ a: SiteID, _ b: SiteID) -> Double {
        latencies[a]?[b] ?? scenario.network.defaultLatencyMS
    }

    /// One-way latency between every pair of sites, from the scenario's domain pairs.
    static func latencyTable(_ scenario: Scenario) -> [SiteID: [SiteID: Double]] {
        var table: [SiteID: [SiteID: Double]] = [:]
        for a in scenario.sites {
            for b in scenario.sites where a.id != b.id {
                let (da, db) = (a.domain, b.domain)
                let ms = da == db ? scenario.network.sameDomainLatencyMS
                    : scenario.network.latencyMS["\(da)-\(db)"] ?? scenario.network.latencyMS["\(db)-\(da)"] ?? scenario.network.defaultLatencyMS
                table[SiteID(a.id), default: [:]][SiteID(b.id)] = ms
            }
        }
        return table
    }

    mutating func send(_ m: Message) {
        guard !isBlocked(m.from, m.to) else { return }
        if loss > 0 && rng.chance(loss) { return }
        let copies = scenario.network.duplication > 0 && rng.chance(scenario.network.duplication) ? 2 : 1
        for _ in 0..<copies {
            let jitter = scenario.network.jitterMS > 0 ? Double(rng.next() % 10_000) / 10_000 * scenario.network.jitterMS : 0
            let delay = VirtualTime((latency(m.from, m.to) + jitter) * 1e6)
            queue.push(now + max(delay, 1), .deliver(m))
        }
    }

    // MARK: Snapshots and compaction

    /// Sites snapshot their state and drop the log it covers, keeping a margin, so that a
    /// site back from a long outage must take the snapshot path.
    mutating func compactIfDue(_ s: SimulatedSite) {
        guard s.descriptor.role == .voter, s.core != nil else { return }
        let covered = min(s.appliedLSN, s.commitLSN)
        guard covered.rawValue >= s.log.firstLSN.rawValue + 600 else { return }
        s.snapshot = (covered, s.appliedTerm, s.stateHash)
        let through = LSN(covered.rawValue - 200)
        s.log.compact(through: through)
        s.disk.compact(through: through)
        step(s, .compacted(through: through))
    }

    mutating func sendSnapshot(from s: SimulatedSite, to peer: SiteID) {
        guard let snap = s.snapshot, let target = sites[peer], !isBlocked(s.id, peer) else { return }
        let delay = VirtualTime((latency(s.id, peer) * 3 + 20) * 1e6)
        queue.push(now + delay, .snapshotArrives(site: peer, epoch: target.epoch, lsn: snap.lsn, term: snap.term, hash: snap.hash))
        note("\(s.id) sends a snapshot at \(snap.lsn) to \(peer)")
    }

    mutating func installSnapshot(_ s: SimulatedSite, lsn: LSN, term: Term, hash: UInt64) {
        guard lsn > s.appliedLSN else { return }
        checker.installedSnapshot(now, site: s.id, lsn: lsn, hash: hash)
        s.appliedLSN = lsn
        s.appliedTerm = term
        s.stateHash = hash
        s.snapshot = (lsn, term, hash)
        if s.log.record(at: lsn)?.term != term {
            s.log.reset(after: lsn, term: term)
            s.disk.reset(after: lsn, term: term)
        } else {
            s.log.compact(through: lsn)
            s.disk.compact(through: lsn)
        }
        note("\(s.id) installs a snapshot at \(lsn)")
        step(s, .snapshotInstalled(lsn: lsn, term: term))
    }

    // MARK: Faults

    mutating func crash(_ s: SimulatedSite) {
        guard s.up else { return }
        // Some writes that were never reported durable reach the disk anyway.
        let ops = s.pending.isEmpty ? 0 : Int(rng.next() % UInt64(s.pending.count + 1))
        let records = Int(rng.next() % 8)
        let (hardStates, kept) = s.crash(survivingOps: ops, survivingRecords: records)
        for h in hardStates { checker.persistedTerm(now, site: s.id, term: h.term) }
        if kept > 0 || !hardStates.isEmpty { note("\(s.id) crashed; \(kept) unsynced records survived on disk") }
        lane(s.id, "down")
    }

    mutating func restart(_ s: SimulatedSite) {
        guard !s.up else { return }
        if s.diskFull {
            mark("\(s.id) cannot restart: its disk is full")
            return
        }
        s.fsyncFails = false
        start(s.id)
        mark("\(s.id) restarts (term \(s.diskHardState.term), log to \(s.disk.lastLSN), applied \(s.appliedLSN))")
    }

    var currentPrimary: SimulatedSite? {
        order.compactMap { sites[$0] }.filter { $0.isRunning && $0.role == .primary }.max { $0.term < $1.term }
    }

    mutating func fault(_ action: Scenario.Action) {
        let label: String
        switch action {
        case let .crash(site):
            if let s = sites[SiteID(site)] { crash(s) }
            label = "crash \(site)"
        case let .crashDomain(domain):
            for id in order where sites[id]?.descriptor.domain.name == domain { if let s = sites[id] { crash(s) } }
            label = "fire: campus \(domain) lost"
        case let .loseDisk(site):
            if let s = sites[SiteID(site)] {
                if s.up { crash(s) }
                s.loseDisk()
                checker.diskLost(site: s.id)
                lane(s.id, "disk lost")
            }
            label = "\(site) loses its disk"
        case let .restart(site):
            if let s = sites[SiteID(site)] { restart(s) }
            label = "restart \(site)"
            lastHealTime = now
        case let .restartDomain(domain):
            for id in order where sites[id]?.descriptor.domain.name == domain { if let s = sites[id] { restart(s) } }
            label = "restart campus \(domain)"
            lastHealTime = now
        case let .partition(groups, oneWay):
            for a in groups[0] {
                for b in groups[1] {
                    blocked.insert(key(SiteID(a), SiteID(b)))
                    if !oneWay { blocked.insert(key(SiteID(b), SiteID(a))) }
                }
            }
            label = "partition \(groups[0]) \(oneWay ? "->" : "|") \(groups[1])"
        case let .isolateDomain(domain):
            for a in order where sites[a]?.descriptor.domain.name == domain {
                for b in order where sites[b]?.descriptor.domain.name != domain { setLink(a, b, down: true) }
            }
            label = "isolate campus \(domain)"
        case .heal:
            blocked = []
            loss = scenario.network.loss
            label = "network healed"
            lastHealTime = now
        case let .pause(site, secs):
            if let s = sites[SiteID(site)] { pause(s, seconds: secs) }
            label = "pause \(site) for \(secs) s"
            lastHealTime = max(lastHealTime, now + VirtualTime(secs * 1e9))
        case let .clockDrift(site, ppm):
            sites[SiteID(site)]?.setDrift(ppm, at: now)
            label = "clock of \(site) drifts \(ppm) ppm"
        case let .slowDisk(site, ms):
            sites[SiteID(site)]?.fsyncMS = ms
            label = "disk of \(site): fsync \(ms) ms"
        case let .fsyncError(site):
            sites[SiteID(site)]?.fsyncFails = true
            label = "fsync error on \(site)"
        case let .diskFull(site):
            sites[SiteID(site)]?.diskFull = true
            label = "disk full on \(site)"
        case let .diskFreed(site):
            if let s = sites[SiteID(site)] {
                s.diskFull = false
                if s.up { startSync(s) }
            }
            label = "disk freed on \(site)"
            lastHealTime = now
        case let .flapLink(a, b, period, until):
            queue.push(now, .flap(a: SiteID(a), b: SiteID(b), down: true, period: VirtualTime(period * 1e9), until: VirtualTime(until * 1e9)))
            label = "link \(a)-\(b) flaps every \(period) s until \(until) s"
            lastHealTime = max(lastHealTime, VirtualTime(until * 1e9))
        case let .switchover(to):
            if let p = currentPrimary { step(p, .transferLeadership(to: SiteID(to))) }
            label = "switchover to \(to)"
        case .crashPrimary:
            let p = currentPrimary
            if let p { crash(p) }
            label = "crash the primary (\(p?.id.name ?? "none"))"
        case let .pausePrimary(secs):
            let p = currentPrimary
            if let p { pause(p, seconds: secs) }
            label = "pause the primary (\(p?.id.name ?? "none")) for \(secs) s"
            lastHealTime = max(lastHealTime, now + VirtualTime(secs * 1e9))
        case .isolatePrimary:
            let p = currentPrimary
            if let p { for b in order where b != p.id { setLink(p.id, b, down: true) } }
            label = "isolate the primary (\(p?.id.name ?? "none"))"
        case .stopWorkload:
            workloadOn = false
            label = "workload stops"
        case let .setLoss(l):
            loss = l
            label = "packet loss \(Int(l * 100))%"
        }
        faultMarks.append((seconds, label))
        mark("FAULT " + label)
    }

    mutating func pause(_ s: SimulatedSite, seconds secs: Double) {
        guard s.isRunning else { return }
        s.pausedUntil = now + VirtualTime(secs * 1e9)
        lane(s.id, "paused")
        queue.push(now + VirtualTime(secs * 1e9), .resume(site: s.id, epoch: s.epoch))
    }

    func laneState(_ s: SimulatedSite) -> String {
        guard s.up else { return "down" }
        if s.pausedUntil != nil { return "paused" }
        switch s.role {
        case .primary: return "primary"
        case .candidate, .preCandidate: return "candidate"
        default: return s.descriptor.role == .witness ? "witness" : "follower"
        }
    }

    // MARK: Workload

    mutating func scheduleNextWrite() {
        let rate = scenario.workload.writesPerSecond
        guard rate > 0 else { return }
        // Exponential inter-arrival times (Poisson arrivals).
        let u = max(1e-12, Double(rng.next() >> 11) / Double(1 << 53))
        let gap = -log(u) / rate
        queue.push(now + VirtualTime(gap * 1e9), .clientWrite)
    }

    mutating func payload(for writeID: Int) -> [UInt8] {
        let w = scenario.workload
        let total = w.bookings + w.cancellations + w.consultations + w.documents
        let pick = Double(rng.next() % 1_000_000) / 1_000_000 * max(total, 1e-9)
        let (kind, size): (UInt8, Int) =
            pick < w.bookings ? (1, 180)
            : pick < w.bookings + w.cancellations ? (2, 90)
            : pick < w.bookings + w.cancellations + w.consultations ? (3, 400)
            : (4, w.documentBytes)
        var bytes = [UInt8](repeating: 0, count: max(size, 9))
        var id = UInt64(writeID)
        for i in 0..<8 {
            bytes[i] = UInt8(id & 0xFF)
            id >>= 8
        }
        bytes[8] = kind
        return bytes
    }

    mutating func attemptWrite(_ writeID: Int) {
        guard let first = waiting[writeID] else { return }
        // Clients go where the load balancer sends writes: the site answering /primary.
        var target: SimulatedSite?
        for id in order {
            guard let s = sites[id], s.up, s.pausedUntil == nil else { continue }
            if let until = s.leaseUntil, s.localTime(now) < until {
                target = s
                break
            }
        }
        if let s = target, var core = s.core.take() {
            defer { if s.core == nil { s.core = core } }
            do {
                let (lsn, ready) = try core.propose(kind: .changeset, payload: payload(for: writeID), at: s.localTime(now))
                s.remember(core)
                s.core = core
                s.proposals[lsn] = writeID
                waiting[writeID] = nil
                proposed += 1
                perform(s, ready)
                return
            } catch {
                // Refused (switchover, back-pressure): retry like a client would.
            }
        }
        if now - first > 30_000_000_000 {
            waiting[writeID] = nil
            failed += 1
            return
        }
        queue.push(now + 50_000_000, .retryWrite(id: writeID))
    }

    mutating func acknowledge(_ writeID: Int, record: LogRecord) {
        acknowledgedCount += 1
        highestAcknowledged = max(highestAcknowledged, record.lsn)
        checker.acknowledge(now, record: record)
        // If a newer primary exists, its log must hold what this (older) primary acknowledged.
        if let newest = order.compactMap({ sites[$0] }).filter({ $0.isRunning && $0.role == .primary && $0.term > record.term })
            .max(by: { $0.term < $1.term }) {
            checker.staleAcknowledgement(now, record: record, newestPrimary: newest.id, newestTerm: newest.term,
                                         termThere: newest.log.record(at: record.lsn)?.term)
        }
    }

    mutating func scheduleNextRead() {
        let rate = scenario.workload.writesPerSecond
        guard rate > 0 else { return }
        let u = max(1e-12, Double(rng.next() >> 11) / Double(1 << 53))
        queue.push(now + VirtualTime(-log(u) / rate * 1e9), .clientRead)
    }

    /// A linearizable read goes where the load balancer sends it (the site answering
    /// /primary) and is served from its lease: it must reflect every write acknowledged
    /// before it started.
    mutating func linearizableRead() {
        for id in order {
            guard let s = sites[id], s.up, s.pausedUntil == nil, let until = s.leaseUntil, s.localTime(now) < until else { continue }
            reads += 1
            if s.appliedLSN < highestAcknowledged {
                checker.staleRead(now, site: id, applied: s.appliedLSN, acknowledged: highestAcknowledged)
            }
            return
        }
    }

    // MARK: Invariants over time

    mutating func checkLeases() {
        var holders: [SiteID] = []
        for id in order {
            guard let s = sites[id], s.up, s.pausedUntil == nil else { continue }
            if let until = s.leaseUntil, s.localTime(now) < until { holders.append(id) }
        }
        checker.checkLeases(now, holders: holders)
        if holders.isEmpty {
            if noLeaseSince == nil { noLeaseSince = now }
        } else if let since = noLeaseSince {
            let p = holders[0]
            let term = sites[p]?.term.rawValue ?? 0
            if since > 0 || lastHolder != nil {
                failovers.append(.init(fromSeconds: Double(since) / 1e9, toSeconds: seconds, newPrimary: p.name, term: term))
            }
            noLeaseSince = nil
            lastHolder = p
            if now >= lastHealTime { primaryAfterHeal = true }
        }
        if !holders.isEmpty && now >= lastHealTime && !primaryAfterHeal { primaryAfterHeal = true }
    }

    mutating func finish() {
        // Liveness: after the faults healed, a primary within the bound.
        let bound = VirtualTime(scenario.expect.recoverWithinSeconds * 1e9)
        let healedOutage = failovers.filter { VirtualTime($0.toSeconds * 1e9) > lastHealTime }
        if let open = noLeaseSince, now > lastHealTime, now - max(open, lastHealTime) > bound {
            checker.fail(now, "liveness", "no primary since \(String(format: "%.3f", Double(open) / 1e9)) s, after the faults healed at \(String(format: "%.3f", Double(lastHealTime) / 1e9)) s")
        }
        for f in healedOutage where VirtualTime(f.toSeconds * 1e9) - max(VirtualTime(f.fromSeconds * 1e9), lastHealTime) > bound {
            checker.fail(now, "liveness", "a primary took \(String(format: "%.3f", f.recoverySeconds)) s to appear after the faults healed (bound \(scenario.expect.recoverWithinSeconds) s)")
        }
        // Convergence: every running voter ends with the same applied state.
        if scenario.expect.converge {
            let running = order.compactMap { sites[$0] }.filter { $0.isRunning && $0.descriptor.role == .voter }
            let maxApplied = running.map(\.appliedLSN).max() ?? .zero
            for s in running where s.appliedLSN != maxApplied {
                checker.fail(now, "convergence", "\(s.id) applied \(s.appliedLSN), others \(maxApplied), \(Self.settleSeconds) s after writes stopped")
            }
        }
        let committed = LSN(sites.values.filter(\.up).map(\.commitLSN.rawValue).max() ?? 0)
        for id in order {
            guard let s = sites[id], s.descriptor.role == .witness else { continue }
            checker.witnessLog(now, site: id, records: s.disk.records, committedThrough: committed)
        }
        let lost = checker.lostAcknowledged(finalHistory: checker.history)
        if lost > scenario.expect.maxLostAcknowledged {
            checker.fail(now, "acknowledged-writes-kept", "\(lost) acknowledged writes lost (allowed: \(scenario.expect.maxLostAcknowledged))")
        }
    }

    func result(wall: Double) -> SimulationResult {
        let lost = checker.lostAcknowledged(finalHistory: checker.history)
        return SimulationResult(
            scenario: scenario.name, seed: seed, virtualSeconds: scenario.durationSeconds, wallSeconds: wall, events: events,
            violations: checker.violations.map { .init(timeSeconds: Double($0.time) / 1e9, invariant: $0.invariant, detail: $0.detail) },
            trace: Array(trace.suffix(traceLimit)), timeline: timeline, failovers: failovers,
            writesProposed: proposed, writesAcknowledged: acknowledgedCount, writesFailed: failed, writesLost: lost, linearizableReads: reads,
            // Witnesses keep no database: only voters have an applied LSN.
            finalAppliedLSN: Dictionary(uniqueKeysWithValues: order.compactMap { id in
                sites[id].flatMap { $0.descriptor.role == .voter ? (id.name, $0.appliedLSN.rawValue) : nil }
            }),
            finalCommitLSN: sites.values.filter(\.up).map(\.commitLSN.rawValue).max() ?? 0,
            lanes: order.map { SimulationResult.Lane(site: $0.name, states: lanes[$0] ?? []) }, maxLagRecords: maxLag,
            commitProgress: commitProgress, faultMarks: faultMarks)
    }
}
