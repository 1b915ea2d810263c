import TandemModel

/// The election and replication state machine of one site: pure, with no I/O, clock,
/// thread, lock or random number inside. Each input (`step`) carries the local
/// monotonic time and a random value, and returns a `Ready` with everything to do.
/// The daemon and the simulator drive the same core. Rules and their safety argument:
/// docs/PROTOCOL.md.
public struct Core: Sendable {
    public let id: SiteID
    public let config: ClusterConfig
    public let me: SiteDescriptor

    public private(set) var hardState: HardState
    public private(set) var log: LogView
    public private(set) var role: CoreRole = .follower
    /// The primary this site follows (or itself), if known in the current term.
    public private(set) var primaryID: SiteID?
    /// Highest LSN known committed.
    public private(set) var commitLSN: LSN
    /// The highest commit LSN a primary has announced to this site (a replica's lag is
    /// measured against it; its own `commitLSN` stops at the records it holds).
    public private(set) var primaryCommitLSN: LSN = .zero
    /// A site rebuilt after losing its disk forgot the votes it cast: until a primary's
    /// append tells it the current term (and it records that primary as its vote there),
    /// it neither votes nor campaigns, so it cannot vote twice in a term (PROTOCOL.md V5).
    public private(set) var abstaining = false
    /// Highest LSN durable in the local log.
    public private(set) var durableLSN: LSN

    // Time, in this site's clock.
    public private(set) var now: Instant
    private var entropy: UInt64 = 0
    /// Until then this site grants no vote and no pre-vote to anyone but a switchover.
    public private(set) var promiseUntil: Instant
    private var electionDeadline: Instant

    // Candidate state.
    private var preVotes: Set<SiteID> = []
    private var votes: Set<SiteID> = []
    private var refusals: Set<SiteID> = []
    private var fetchingFrom: SiteID?
    /// Fetches this site answers from its log (not its cache): peer → where they matched.
    private var servingFetch: [SiteID: (prevLSN: LSN, prevTerm: Term)] = [:]

    // Primary state.
    private var progress: [SiteID: PeerProgress] = [:]
    private var round: UInt64 = 0
    private var roundSentAt: [UInt64: Instant] = [:]
    /// Rounds at or below this do not count toward the lease (given up by a switchover).
    private var leaseFloorRound: UInt64 = 0
    /// The primary's lease, on its own clock.
    public private(set) var leaseUntil: Instant = 0
    /// Send time of the last round a majority acknowledged (kept through a switchover,
    /// which gives up the lease but not the majority): check-quorum counts from it.
    private var quorumContactSentAt: Instant = 0
    private var nextHeartbeat: Instant = 0
    private var primarySince: Instant = 0
    private var termStartLSN: LSN = .zero
    private var hadMajority = false
    private var lostMajorityInTerm = false
    private var transfer: Transfer?
    private var needsBroadcast = false
    private var pendingReads: [(id: UInt64, lsn: LSN, round: UInt64)] = []
    private var needsReadRound = false

    // Follower state.
    private var pendingAck: (primary: SiteID, term: Term, match: LSN, round: UInt64)?
    private var emittedCommit: LSN

    /// A deliberate bug, for showing that the simulator's checkers catch one. Never set
    /// outside tests.
    public enum TestingFlaw: String, Sendable, CaseIterable {
        /// Grant votes while a promise to a live primary still runs (breaks the lease).
        case grantVotesDuringLease
        /// Commit records as soon as they are appended, without a quorum.
        case commitWithoutQuorum
        /// Vote at once after a restart on an empty disk, instead of abstaining until a
        /// primary is heard (E10: the site may already have voted in the current term).
        case ignoreAbstention
    }
    private let flaw: TestingFlaw?

    // Output.
    private var ready = Ready()
    private var storageSequence: UInt64 = 0
    private var pendingStorage: [(id: UInt64, last: LSN)] = []

    struct PeerProgress: Sendable {
        var match: LSN = .zero
        var next: LSN
        /// Probing: one append at a time until the logs are found to match.
        var probing = true
        var inflight: [(last: LSN, bytes: Int, sentAt: Instant)] = []
        var inflightBytes = 0
        var ackedRound: UInt64 = 0
        var readPending = false
        var readRequestedAt: Instant = 0
        var needsSnapshot = false
        var snapshotRequestedAt: Instant = 0
        var lastContact: Instant = 0
    }

    struct Transfer: Sendable {
        var target: SiteID
        var deadline: Instant
        var timeoutSent = false
    }

    /// A core for site `id`, starting from what survived on disk: its hard state and its
    /// log. `commitLSN` is an LSN known committed (0 is always safe). A restarted site
    /// has lost the promises it made, so it grants no vote until a lease has run out.
    public init(id: SiteID, config: ClusterConfig, hardState: HardState, log: LogView, commitLSN: LSN = .zero,
                now: Instant, entropy: UInt64, flaw: TestingFlaw? = nil, abstaining: Bool = false) throws(ConfigError) {
        self.flaw = flaw
        self.abstaining = flaw == .ignoreAbstention ? false : abstaining
        try config.validate()
        guard let me = config.site(id) else { throw .invalid("site_id", "one of the configured sites, got \(id)") }
        self.id = id
        self.config = config
        self.me = me
        self.hardState = hardState
        self.log = log
        self.commitLSN = min(commitLSN, log.lastLSN)
        durableLSN = log.lastLSN
        emittedCommit = self.commitLSN
        self.now = now
        self.entropy = entropy
        promiseUntil = now + config.timing.promiseDuration
        electionDeadline = 0
        electionDeadline = randomizedDeadline(after: promiseUntil)
    }

    // MARK: Queries

    /// Whether this site may serve a read from its lease now, without a round trip: it is
    /// the primary, its lease (counted from the send time of the round a majority
    /// acknowledged, shortened by the drift bound) has not run out, no switchover is
    /// giving it up, and its term's first record has committed. Check it at the moment
    /// the read is served.
    public func canServeLeaseRead(at time: Instant) -> Bool {
        role == .primary && transfer == nil && time < leaseUntil && commitLSN >= termStartLSN
    }

    /// Whether a proposal would be accepted now.
    public var isAcceptingProposals: Bool { role == .primary && transfer == nil && now < leaseUntil }

    /// What the primary knows of a peer: (match LSN, last contact), for status pages.
    public func peerState(_ peer: SiteID) -> (match: LSN, lastContact: Instant)? {
        progress[peer].map { ($0.match, $0.lastContact) }
    }

    public var switchoverTarget: SiteID? { transfer?.target }

    // MARK: Inputs

    /// Feeds one input at local time `time` with a random value `entropy`, and returns
    /// what to do.
    public mutating func step(_ event: CoreEvent, at time: Instant, entropy: UInt64) -> Ready {
        now = max(now, time)
        self.entropy = entropy
        switch event {
        case .tick: tick()
        case let .message(m): receive(m)
        case let .persisted(storageID): persisted(storageID)
        case let .logRead(peer, records): logRead(peer: peer, records: records)
        case let .compacted(through): log.compact(through: min(through, commitLSN))
        case let .snapshotInstalled(lsn, term): snapshotInstalled(lsn: lsn, term: term)
        case let .transferLeadership(target): startTransfer(to: target)
        case let .readIndex(readID): readIndex(readID)
        }
        return takeReady()
    }

    /// Proposes a record of `kind` at the next LSN in this primary's term. The record is
    /// in the returned Ready's `append`; it commits when the commit policy is met.
    public mutating func propose(kind: RecordKind, payload: [UInt8], at time: Instant) throws(ProposalError) -> (LSN, Ready) {
        let (first, ready) = try propose([(kind, payload[...])], at: time)
        return (first, ready)
    }

    /// Proposes several records at consecutive LSNs from the returned one, all or none
    /// (each refusal reason holds for the whole group). They travel in one Ready: one
    /// append to the log, and one message per peer where they fit, instead of one of each
    /// per record; the caller groups the writes that arrived together.
    public mutating func propose(_ records: [(kind: RecordKind, payload: ArraySlice<UInt8>)], at time: Instant) throws(ProposalError) -> (LSN, Ready) {
        now = max(now, time)
        if let refusal = proposalRefusal(count: records.count, at: now) { throw refusal }
        let first = log.lastLSN.next
        for r in records { _ = appendLocal(kind: r.kind, payload: r.payload) }
        return (first, takeReady())
    }

    /// Why a group of `count` records proposed at `time` would be refused, or nil. The
    /// driver asks before it executes writes, so that it does not execute what the core
    /// would refuse (`propose` asks again).
    public func proposalRefusal(count: Int, at time: Instant) -> ProposalError? {
        guard role == .primary else { return .notPrimary(knownPrimary: primaryID) }
        guard transfer == nil else { return .switchoverInProgress }
        // No new write is taken without a lease: a primary that may already have been
        // replaced stops accepting writes before its lease can have expired anywhere.
        guard max(now, time) < leaseUntil else { return .noLease }
        guard count <= uncommittedRoom else { return .tooManyUncommitted(limit: config.limits.maxUncommittedRecords) }
        if case let .async(maxLag) = config.commitPolicy, config.sites.count > 1 {
            let lag = log.lastLSN.rawValue - replicaQuorumMatch().rawValue
            guard lag + UInt64(max(1, count)) <= maxLag else { return .replicasTooFarBehind(lagRecords: lag, limit: maxLag) }
        }
        return nil
    }

    /// How many more records may be proposed before the uncommitted limit is reached.
    public var uncommittedRoom: Int {
        max(0, config.limits.maxUncommittedRecords - Int(log.lastLSN.rawValue - commitLSN.rawValue))
    }

    /// The next LSN a proposal would get (the state store executes at it first).
    public var nextLSN: LSN { log.lastLSN.next }

    // MARK: Time

    private mutating func tick() {
        switch role {
        case .primary:
            if now >= nextHeartbeat { broadcastRound() }
            updateLeaseState()
            if let t = transfer, now >= t.deadline {
                transfer = nil
                if t.timeoutSent {
                    // The target may still campaign with the transfer flag, which voters
                    // grant despite their promises: this site must never hold a lease in
                    // this term again, so it steps down instead of resuming.
                    ready.roleChanges.append(.switchoverAborted(to: t.target, reason: "timed out after the hand-over was sent; stepping down"))
                    becomeFollower(term: hardState.term, primary: nil, reason: "switchover to \(t.target) timed out")
                    return
                }
                ready.roleChanges.append(.switchoverAborted(to: t.target, reason: "timed out"))
                // Only rounds sent from now on count toward a new lease.
                leaseFloorRound = round
                broadcastRound()
            }
            // Check-quorum: a primary that has not had a majority's acknowledgement for a
            // lease steps down, so a minority primary does not linger. (Measured apart from
            // the lease, which a switchover gives up on purpose.)
            let grace = config.timing.leaseDuration
            if now >= max(primarySince, quorumContactSentAt) + grace {
                becomeFollower(term: hardState.term, primary: nil, reason: "no majority for a lease duration (check-quorum)")
            }
        case .follower, .preCandidate, .candidate:
            guard me.role == .voter, !abstaining, now >= electionDeadline else { return }
            startPreVote()
        }
    }

    private func randomizedDeadline(after base: Instant) -> Instant {
        let jitter = config.timing.electionJitter
        return base + (jitter == 0 ? 0 : entropy % jitter)
    }

    // MARK: Messages

    private mutating func receive(_ m: Message) {
        guard m.to == id, config.site(m.from) != nil, m.from != id else { return }
        if m.term > hardState.term {
            switch m.body {
            case .preVote:
                // A pre-vote carries the term the candidate would use; it changes nothing.
                break
            case .preVoteResponse(granted: true, _, _):
                break
            case let .vote(_, _, transfer) where !transfer && (now < promiseUntil || (role == .primary && now < leaseUntil))
                && flaw != .grantVotesDuringLease:
                // Disruptive-server rule: while this site's promise to a live primary runs,
                // a vote request does not even raise its term.
                send(Message(from: id, to: m.from, term: hardState.term,
                             body: .voteResponse(granted: false, lastLSN: log.lastLSN, lastTerm: log.lastTerm)), afterPersist: false)
                return
            case .append, .timeoutNow:
                becomeFollower(term: m.term, primary: m.from, reason: "a primary with a higher term")
            default:
                becomeFollower(term: m.term, primary: nil, reason: "a higher term")
            }
        } else if m.term < hardState.term {
            // Stale: answer with our term so a deposed primary or candidate learns of it.
            switch m.body {
            case .append:
                send(Message(from: id, to: m.from, term: hardState.term,
                             body: .appendResponse(AppendResponse(success: false, matchLSN: .zero, lastLSN: log.lastLSN, round: 0))),
                     afterPersist: false)
            case .preVote:
                send(Message(from: id, to: m.from, term: hardState.term,
                             body: .preVoteResponse(granted: false, lastLSN: log.lastLSN, lastTerm: log.lastTerm)), afterPersist: false)
            case .vote:
                send(Message(from: id, to: m.from, term: hardState.term,
                             body: .voteResponse(granted: false, lastLSN: log.lastLSN, lastTerm: log.lastTerm)), afterPersist: false)
            default:
                break
            }
            return
        }

        switch m.body {
        case let .preVote(lastLSN, lastTerm): onPreVote(m, lastLSN: lastLSN, lastTerm: lastTerm)
        case let .preVoteResponse(granted, lastLSN, lastTerm): onPreVoteResponse(m, granted: granted, lastLSN: lastLSN, lastTerm: lastTerm)
        case let .vote(lastLSN, lastTerm, transfer): onVote(m, lastLSN: lastLSN, lastTerm: lastTerm, transfer: transfer)
        case let .voteResponse(granted, lastLSN, lastTerm): onVoteResponse(m, granted: granted, lastLSN: lastLSN, lastTerm: lastTerm)
        case let .append(a): onAppend(m, a)
        case let .appendResponse(r): onAppendResponse(m, r)
        case .timeoutNow: onTimeoutNow(m)
        case let .fetch(prevLSN, prevTerm): onFetch(m, prevLSN: prevLSN, prevTerm: prevTerm)
        case let .fetchResponse(r): onFetchResponse(m, r)
        }
    }

    // MARK: Elections

    private mutating func startPreVote() {
        role = .preCandidate
        primaryID = nil
        preVotes = [id]
        votes = []
        refusals = []
        fetchingFrom = nil
        // A pre-vote changes nobody's state, so a refused one is retried soon (a peer's
        // promise may end a few milliseconds after this site's).
        electionDeadline = randomizedDeadline(after: now + config.timing.heartbeatInterval / 2)
        if preVotes.count >= config.quorumSize {
            startElection(transfer: false)
            return
        }
        for s in config.sites where s.id != id {
            send(Message(from: id, to: s.id, term: Term(hardState.term.rawValue + 1),
                         body: .preVote(lastLSN: log.lastLSN, lastTerm: log.lastTerm)), afterPersist: false)
        }
    }

    private mutating func onPreVote(_ m: Message, lastLSN: LSN, lastTerm: Term) {
        let upToDate = log.isAtMostAsUpToDate(asLSN: lastLSN, term: lastTerm)
        let leaseRunning = (now < promiseUntil || (role == .primary && now < leaseUntil)) && flaw != .grantVotesDuringLease
        let granted = m.term > hardState.term && upToDate && !leaseRunning && !abstaining
        send(Message(from: id, to: m.from, term: granted ? m.term : hardState.term,
                     body: .preVoteResponse(granted: granted, lastLSN: log.lastLSN, lastTerm: log.lastTerm)), afterPersist: false)
    }

    private mutating func onPreVoteResponse(_ m: Message, granted: Bool, lastLSN: LSN, lastTerm: Term) {
        guard role == .preCandidate else { return }
        if granted {
            guard m.term == Term(hardState.term.rawValue + 1) else { return }
            preVotes.insert(m.from)
            if preVotes.count >= config.quorumSize { startElection(transfer: false) }
            return
        }
        refusals.insert(m.from)
        fetchIfBehind(m.from, lastLSN: lastLSN, lastTerm: lastTerm)
    }

    /// When a voter refused because it holds records this site lacks (typically a
    /// witness after the primary's datacenter was lost), fetch them from it, then ask again.
    private mutating func fetchIfBehind(_ peer: SiteID, lastLSN: LSN, lastTerm: Term) {
        let ahead = log.isAtMostAsUpToDate(asLSN: lastLSN, term: lastTerm) && !(lastTerm == log.lastTerm && lastLSN == log.lastLSN)
        guard ahead, fetchingFrom == nil else { return }
        fetchingFrom = peer
        electionDeadline = max(electionDeadline, now + config.timing.leaseDuration)
        send(Message(from: id, to: peer, term: hardState.term, body: .fetch(prevLSN: log.lastLSN, prevTerm: log.lastTerm)),
             afterPersist: false)
    }

    private mutating func startElection(transfer: Bool) {
        role = .candidate
        primaryID = nil
        hardState.term = Term(hardState.term.rawValue + 1)
        hardState.votedFor = id
        ready.hardState = hardState
        votes = [id]
        refusals = []
        fetchingFrom = nil
        electionDeadline = randomizedDeadline(after: now + config.timing.heartbeatInterval)
        if votes.count >= config.quorumSize {
            becomePrimary()
            return
        }
        for s in config.sites where s.id != id {
            send(Message(from: id, to: s.id, term: hardState.term,
                         body: .vote(lastLSN: log.lastLSN, lastTerm: log.lastTerm, transfer: transfer)), afterPersist: true)
        }
    }

    private mutating func onVote(_ m: Message, lastLSN: LSN, lastTerm: Term, transfer: Bool) {
        let upToDate = log.isAtMostAsUpToDate(asLSN: lastLSN, term: lastTerm)
        let free = hardState.votedFor == nil || hardState.votedFor == m.from
        // A running promise (to a live primary, or the one a restart assumes) blocks the
        // vote, unless the candidate is that primary itself or a switchover asks.
        let leaseRunning = (role == .primary || (now < promiseUntil && primaryID != m.from)) && flaw != .grantVotesDuringLease
        let granted = free && upToDate && (transfer || !leaseRunning) && role != .primary && !abstaining
        if granted {
            hardState.votedFor = m.from
            ready.hardState = hardState
            electionDeadline = randomizedDeadline(after: now + config.timing.leaseDuration)
        }
        send(Message(from: id, to: m.from, term: hardState.term,
                     body: .voteResponse(granted: granted, lastLSN: log.lastLSN, lastTerm: log.lastTerm)),
             afterPersist: true)
    }

    private mutating func onVoteResponse(_ m: Message, granted: Bool, lastLSN: LSN, lastTerm: Term) {
        guard role == .candidate, m.term == hardState.term else { return }
        if granted {
            votes.insert(m.from)
            refusals.remove(m.from)
            if votes.count >= config.quorumSize { becomePrimary() }
            return
        }
        refusals.insert(m.from)
        fetchIfBehind(m.from, lastLSN: lastLSN, lastTerm: lastTerm)
    }

    private mutating func onFetch(_ m: Message, prevLSN: LSN, prevTerm: Term) {
        let reply: FetchResponse
        if let t = log.term(at: prevLSN), t == prevTerm,
           let records = log.cachedRecords(from: prevLSN.next, maxBytes: config.limits.maxMessageBytes) {
            reply = FetchResponse(success: true, prevLSN: prevLSN, prevTerm: prevTerm, records: Array(records.prefix { $0.lsn <= durableLSN }),
                                  lastLSN: log.lastLSN)
        } else if let t = log.term(at: prevLSN), t == prevTerm, prevLSN < log.lastLSN {
            // Matching, but older than the cache: read the records from the log.
            servingFetch[m.from] = (prevLSN, prevTerm)
            ready.logReads.append(LogReadRequest(peer: m.from, from: prevLSN.next, maxBytes: config.limits.maxMessageBytes))
            return
        } else {
            reply = FetchResponse(success: false, prevLSN: prevLSN, prevTerm: prevTerm, records: [], lastLSN: min(log.lastLSN, prevLSN.previous))
        }
        send(Message(from: id, to: m.from, term: hardState.term, body: .fetchResponse(reply)), afterPersist: false)
    }

    private mutating func onFetchResponse(_ m: Message, _ r: FetchResponse) {
        guard role == .candidate || role == .preCandidate, fetchingFrom == m.from else { return }
        if !r.success {
            // Back off to an earlier point where the logs may match.
            let prev = min(r.lastLSN, log.lastLSN)
            guard prev >= commitLSN, let t = log.term(at: prev) else {
                fetchingFrom = nil
                return
            }
            send(Message(from: id, to: m.from, term: hardState.term, body: .fetch(prevLSN: prev, prevTerm: t)), afterPersist: false)
            return
        }
        // The lender matched our log at prevLSN with prevTerm: it must still match here.
        guard log.term(at: r.prevLSN) == r.prevTerm, acceptRecords(after: r.prevLSN, prevTerm: r.prevTerm, r.records) != nil else {
            fetchingFrom = nil
            return
        }
        if let last = r.records.last, last.lsn < r.lastLSN {
            send(Message(from: id, to: m.from, term: hardState.term, body: .fetch(prevLSN: last.lsn, prevTerm: last.term)),
                 afterPersist: false)
            return
        }
        fetchingFrom = nil
        if role == .preCandidate {
            // Caught up: a fresh pre-vote, once the fetched records are durable (the
            // pre-vote carries this site's last LSN).
            electionDeadline = now
            return
        }
        // Caught up: ask the sites that refused again, once the fetched records are durable.
        for s in refusals.sorted() {
            send(Message(from: id, to: s, term: hardState.term,
                         body: .vote(lastLSN: log.lastLSN, lastTerm: log.lastTerm, transfer: false)), afterPersist: true)
        }
        if !ready.hasStorageWork { ready.hardState = hardState }
    }

    private mutating func onTimeoutNow(_ m: Message) {
        guard me.role == .voter, m.from == primaryID || primaryID == nil else { return }
        startElection(transfer: true)
    }

    // MARK: Roles

    private mutating func becomeFollower(term: Term, primary: SiteID?, reason: String) {
        let wasPrimary = role == .primary
        if term > hardState.term {
            hardState.term = term
            hardState.votedFor = nil
            ready.hardState = hardState
            pendingAck = nil
        }
        role = .follower
        if primary != primaryID { pendingAck = nil }
        primaryID = primary
        progress = [:]
        transfer = nil
        fetchingFrom = nil
        leaseUntil = 0
        if wasPrimary {
            ready.roleChanges.append(.steppedDown(term: hardState.term, reason: reason))
            ready.readsFailed.append(contentsOf: pendingReads.map(\.id))
            pendingReads = []
            needsReadRound = false
        }
        electionDeadline = randomizedDeadline(after: max(promiseUntil, now + config.timing.leaseDuration))
    }

    private mutating func becomePrimary() {
        role = .primary
        primaryID = id
        primarySince = now
        progress = [:]
        for s in config.sites where s.id != id {
            progress[s.id] = PeerProgress(next: log.lastLSN.next)
        }
        round = 0
        roundSentAt = [:]
        leaseFloorRound = 0
        leaseUntil = 0
        quorumContactSentAt = 0
        hadMajority = false
        lostMajorityInTerm = false
        transfer = nil
        ready.roleChanges.append(.becamePrimary(term: hardState.term))
        // The first record of a term is a no-op: committing it commits what came before.
        termStartLSN = appendLocal(kind: .noop, payload: [])
        broadcastRound()
    }

    // MARK: Replication (primary)

    private mutating func appendLocal(kind: RecordKind, payload: ArraySlice<UInt8>) -> LSN {
        let record = LogRecord(term: hardState.term, lsn: log.lastLSN.next, kind: kind, payload: payload)
        log.append([record], maxCachedBytes: config.limits.maxCachedBytes)
        ready.append.append(record)
        needsBroadcast = true
        if config.sites.count == 1 || config.commitPolicy.isAsync { maybeCommit() }
        return record.lsn
    }

    /// A new lease round: every peer gets an append (records or a heartbeat).
    private mutating func broadcastRound() {
        round += 1
        roundSentAt[round] = now
        roundSentAt[round &- 64] = nil
        nextHeartbeat = now + config.timing.heartbeatInterval
        for peer in progress.keys.sorted() { sendAppend(to: peer, heartbeat: true) }
        needsBroadcast = false
        updateLeaseState()
    }

    private mutating func sendAppend(to peer: SiteID, heartbeat: Bool) {
        guard var p = progress[peer] else { return }
        defer { progress[peer] = p }
        let limits = config.limits
        let roomy = p.inflight.count < (p.probing ? 1 : limits.maxInflightMessagesPerPeer)
            && p.inflightBytes < limits.maxInflightBytesPerPeer
        if p.needsSnapshot && now >= p.snapshotRequestedAt + 2 * config.timing.leaseDuration {
            // The snapshot did not arrive (a broken transfer, a partition): ask again.
            p.snapshotRequestedAt = now
            ready.snapshotsNeeded.append(peer)
        }
        var records: [LogRecord] = []
        var prev = p.next.previous
        if roomy && !p.needsSnapshot && p.next <= log.lastLSN {
            if log.term(at: prev) == nil {
                // The peer needs records the log no longer holds: a snapshot.
                p.needsSnapshot = true
                p.snapshotRequestedAt = now
                ready.snapshotsNeeded.append(peer)
            } else if let cached = log.cachedRecords(from: p.next, maxBytes: limits.maxMessageBytes) {
                records = cached
            } else if !p.readPending || now >= p.readRequestedAt + 2 * config.timing.heartbeatInterval {
                // (A read that never came back is asked again.)
                p.readPending = true
                p.readRequestedAt = now
                ready.logReads.append(LogReadRequest(peer: peer, from: p.next, maxBytes: limits.maxMessageBytes))
            }
        }
        if records.isEmpty && !heartbeat { return }
        if records.isEmpty {
            // A heartbeat: at the point known to match (or the probe point), so it does not
            // collide with appends still in flight; a mismatch still renews the lease.
            prev = p.probing ? p.next.previous : p.match
            if log.term(at: prev) == nil { prev = log.lastLSN }
        }
        send(Message(from: id, to: peer, term: hardState.term,
                     body: .append(Append(prevLSN: prev, prevTerm: log.term(at: prev) ?? .zero, records: records,
                                          commitLSN: commitLSN, round: round))), afterPersist: false)
        if let last = records.last {
            let bytes = records.reduce(0) { $0 + $1.payload.count }
            p.inflight.append((last.lsn, bytes, now))
            p.inflightBytes += bytes
            p.next = last.lsn.next
        }
    }

    private mutating func logRead(peer: SiteID, records: [LogRecord]) {
        if role != .primary, let f = servingFetch.removeValue(forKey: peer) {
            // Records a lagging candidate fetches from this site, read from the log.
            let valid = log.term(at: f.prevLSN) == f.prevTerm && records.first?.lsn == f.prevLSN.next
                && records.allSatisfy { log.term(at: $0.lsn) == $0.term && $0.lsn <= durableLSN }
            let reply = valid
                ? FetchResponse(success: true, prevLSN: f.prevLSN, prevTerm: f.prevTerm, records: records, lastLSN: log.lastLSN)
                : FetchResponse(success: false, prevLSN: f.prevLSN, prevTerm: f.prevTerm, records: [], lastLSN: min(log.lastLSN, f.prevLSN.previous))
            send(Message(from: id, to: peer, term: hardState.term, body: .fetchResponse(reply)), afterPersist: false)
            return
        }
        guard role == .primary, var p = progress[peer] else { return }
        p.readPending = false
        progress[peer] = p
        guard let first = records.first, first.lsn == p.next,
              let prevTerm = log.term(at: first.lsn.previous),
              records.allSatisfy({ log.term(at: $0.lsn) == $0.term })
        else { return }
        let bytes = records.reduce(0) { $0 + $1.payload.count }
        send(Message(from: id, to: peer, term: hardState.term,
                     body: .append(Append(prevLSN: first.lsn.previous, prevTerm: prevTerm, records: records,
                                          commitLSN: commitLSN, round: round))), afterPersist: false)
        p.inflight.append((records[records.count - 1].lsn, bytes, now))
        p.inflightBytes += bytes
        p.next = records[records.count - 1].lsn.next
        progress[peer] = p
    }

    private mutating func onAppendResponse(_ m: Message, _ r: AppendResponse) {
        guard role == .primary, m.term == hardState.term, var p = progress[m.from] else { return }
        p.lastContact = now
        // A duplicated or late answer names an older round than one already seen.
        let fresh = r.round >= p.ackedRound
        p.ackedRound = max(p.ackedRound, r.round)
        if r.success {
            p.match = max(p.match, r.matchLSN)
            p.next = max(p.next, p.match.next)
            p.probing = false
            p.needsSnapshot = false
            while let f = p.inflight.first, f.last <= p.match {
                p.inflightBytes -= f.bytes
                p.inflight.removeFirst()
            }
        } else if p.needsSnapshot && log.term(at: r.lastLSN) != nil {
            // The peer installed a snapshot (or otherwise reached the retained log): go on
            // from its end.
            p.needsSnapshot = false
            p.next = max(p.match.next, r.lastLSN.next)
            p.probing = true
            p.inflight = []
            p.inflightBytes = 0
        } else {
            if fresh && r.lastLSN < p.match {
                // The follower's log ends before what it acknowledged: it lost its disk
                // and was rebuilt empty. Its match goes back (commits already made stand;
                // the records are re-sent, or a snapshot if the log no longer has them).
                p.match = r.lastLSN
            }
            // The logs differ before `next`: probe backwards from the follower's end.
            let back = min(r.lastLSN.next, p.next.previous)
            p.next = max(p.match.next, back)
            p.probing = true
            p.inflight = []
            p.inflightBytes = 0
        }
        if let oldest = p.inflight.first, oldest.last > p.match,
           (r.lastLSN < p.next.previous && oldest.sentAt + config.timing.heartbeatInterval <= now)
            || oldest.sentAt + 2 * config.timing.heartbeatInterval <= now {
            // Appends sent a while ago are unacknowledged and the follower's log ends
            // before them, or no answer came for two heartbeats: the appends or their
            // answers were lost (dropped, or the follower restarted). Send again from the
            // last point known to match; the follower skips what it already has.
            p.next = p.match.next
            p.inflight = []
            p.inflightBytes = 0
        }
        progress[m.from] = p
        updateLeaseState()
        maybeCommit()
        if let t = transfer, t.target == m.from, !t.timeoutSent, p.match == log.lastLSN {
            transfer?.timeoutSent = true
            send(Message(from: id, to: m.from, term: hardState.term, body: .timeoutNow), afterPersist: false)
        }
        if p.next <= log.lastLSN { sendAppend(to: m.from, heartbeat: false) }
    }

    /// Recomputes the lease from the rounds a majority acknowledged.
    private mutating func updateLeaseState() {
        guard role == .primary else { return }
        var acked: [UInt64] = [round]
        for s in config.sites where s.id != id { acked.append(progress[s.id]?.ackedRound ?? 0) }
        acked.sort(by: >)
        let quorumRound = acked[config.quorumSize - 1]
        releaseReads(quorumRound: quorumRound)
        if let sent = roundSentAt[quorumRound], quorumRound > 0 {
            quorumContactSentAt = max(quorumContactSentAt, sent)
            if quorumRound > leaseFloorRound, transfer == nil {
                leaseUntil = max(leaseUntil, sent + config.timing.primaryLeaseDuration)
            }
        }
        let valid = now < leaseUntil
        if valid && !hadMajority {
            hadMajority = true
            if lostMajorityInTerm { ready.roleChanges.append(.regainedMajority(term: hardState.term)) }
        } else if !valid && hadMajority && transfer == nil {
            hadMajority = false
            lostMajorityInTerm = true
            ready.roleChanges.append(.lostMajority(term: hardState.term))
        }
    }

    /// The highest LSN that a majority of the other sites hold.
    private func replicaQuorumMatch() -> LSN {
        var matches = config.sites.filter { $0.id != id }.map { progress[$0.id]?.match ?? .zero }
        matches.sort(by: >)
        let need = max(1, config.quorumSize - 1)
        return need <= matches.count ? matches[need - 1] : .zero
    }

    private mutating func maybeCommit() {
        guard role == .primary else { return }
        var candidate = commitLSN
        switch config.commitPolicy {
        case .async:
            candidate = durableLSN
        case .majority, .majorityTwoDomains:
            var holders: [(lsn: LSN, domain: FailureDomain)] = [(durableLSN, me.domain)]
            for s in config.sites where s.id != id { holders.append((progress[s.id]?.match ?? .zero, s.domain)) }
            let values = Set(holders.map(\.lsn)).sorted(by: >)
            for n in values where n > commitLSN {
                let have = holders.filter { $0.lsn >= n }
                guard have.count >= config.quorumSize else { continue }
                if config.commitPolicy == .majorityTwoDomains && !have.contains(where: { $0.domain != me.domain }) { continue }
                candidate = n
                break
            }
        }
        if flaw == .commitWithoutQuorum { candidate = log.lastLSN }
        // Only a record of the current term commits by counting (thesis §5.4.2).
        guard candidate > commitLSN, log.term(at: candidate) == hardState.term else { return }
        commitLSN = candidate
        emitCommit()
    }

    private mutating func emitCommit() {
        let through = role == .primary ? commitLSN : min(commitLSN, durableLSN)
        if through > emittedCommit {
            emittedCommit = through
            ready.committedThrough = through
        }
    }

    // MARK: Replication (follower)

    private mutating func onAppend(_ m: Message, _ a: Append) {
        if role != .follower || primaryID != m.from {
            if role == .primary {
                // Two primaries in one term cannot happen (one vote per term); refuse.
                return
            }
            becomeFollower(term: hardState.term, primary: m.from, reason: "a primary in this term")
        }
        promiseUntil = now + config.timing.promiseDuration
        electionDeadline = randomizedDeadline(after: promiseUntil)
        if abstaining {
            // The primary of this term is known now: recorded as this site's vote in it,
            // it is the only vote this site can ever give in this term.
            abstaining = false
            hardState.votedFor = m.from
            ready.hardState = hardState
        }
        var matched: LSN?
        if a.prevLSN < log.firstLSN.previous {
            // The start of this message is covered by our snapshot (committed): skip it.
            let skip = a.records.filter { $0.lsn > log.firstLSN.previous }
            if let first = skip.first, let t = log.term(at: first.lsn.previous) {
                matched = acceptRecords(after: first.lsn.previous, prevTerm: t, skip)
            } else if skip.isEmpty {
                matched = log.firstLSN.previous
            }
        } else if let t = log.term(at: a.prevLSN), t == a.prevTerm {
            matched = acceptRecords(after: a.prevLSN, prevTerm: a.prevTerm, a.records)
        }
        primaryCommitLSN = max(primaryCommitLSN, a.commitLSN)
        guard let matched else {
            let hint = min(log.lastLSN, a.prevLSN.previous)
            send(Message(from: id, to: m.from, term: hardState.term,
                         body: .appendResponse(AppendResponse(success: false, matchLSN: .zero, lastLSN: hint, round: a.round))),
                 afterPersist: ready.hasStorageWork)
            return
        }
        let newCommit = min(a.commitLSN, matched)
        if newCommit > commitLSN { commitLSN = newCommit }
        emitCommit()
        if matched <= durableLSN && !ready.hasStorageWork {
            send(Message(from: id, to: m.from, term: hardState.term,
                         body: .appendResponse(AppendResponse(success: true, matchLSN: matched, lastLSN: log.lastLSN, round: a.round))),
                 afterPersist: false)
        } else {
            // Acknowledge once the records are durable (see `persisted`).
            pendingAck = (m.from, hardState.term, matched, a.round)
        }
    }

    /// Appends `records` after `prevLSN`, truncating a conflicting suffix. Returns the last
    /// LSN now matching, or nil when the records would remove a committed record (which
    /// the rules make impossible; refused rather than obeyed).
    private mutating func acceptRecords(after prevLSN: LSN, prevTerm: Term, _ records: [LogRecord]) -> LSN? {
        var expected = prevLSN.next
        var toAppend: [LogRecord] = []
        for r in records {
            guard r.lsn == expected else { return nil }
            expected = expected.next
            if !toAppend.isEmpty {
                toAppend.append(r)
                continue
            }
            if let existing = log.term(at: r.lsn) {
                if existing == r.term { continue }
                guard r.lsn > commitLSN else { return nil }
                truncate(after: r.lsn.previous)
            }
            toAppend.append(r)
        }
        if !toAppend.isEmpty {
            if toAppend.count < records.count {
                // An append that overlaps what this site holds (a re-send): the records
                // kept get bytes of their own, or each would keep the whole re-sent frame
                // alive in the cache for the sake of a few new records.
                toAppend = toAppend.map { LogRecord(term: $0.term, lsn: $0.lsn, kind: $0.kind, payload: Array($0.payload)) }
            }
            log.append(toAppend, maxCachedBytes: config.limits.maxCachedBytes)
            ready.append.append(contentsOf: toAppend)
        }
        return records.last?.lsn ?? prevLSN
    }

    private mutating func truncate(after lsn: LSN) {
        log.truncate(after: lsn)
        // Records of this Ready after the cut are dropped too.
        ready.append.removeAll { $0.lsn > lsn }
        ready.truncateAfter = min(ready.truncateAfter ?? lsn, lsn)
        durableLSN = min(durableLSN, lsn)
        for i in pendingStorage.indices { pendingStorage[i].last = min(pendingStorage[i].last, lsn) }
    }

    private mutating func snapshotInstalled(lsn: LSN, term: Term) {
        // An older snapshot than what the log already covers changes nothing.
        guard lsn > log.firstLSN.previous else { return }
        guard lsn > log.lastLSN || log.term(at: lsn) != term else {
            log.compact(through: lsn)
            return
        }
        let diverged = log.term(at: lsn).map { $0 != term } ?? false
        log.reset(after: lsn, term: term)
        durableLSN = lsn
        // A log that diverged below its commit LSN (records lost in an async window) starts
        // over from the snapshot's history.
        commitLSN = diverged ? lsn : max(commitLSN, lsn)
        emittedCommit = diverged ? lsn : max(emittedCommit, lsn)
        pendingStorage = pendingStorage.map { ($0.id, min($0.last, lsn)) }
    }

    // MARK: Storage completions

    private mutating func persisted(_ storageID: UInt64) {
        var last: LSN?
        while let first = pendingStorage.first, first.id <= storageID {
            last = first.last
            pendingStorage.removeFirst()
        }
        guard let last else { return }
        durableLSN = max(durableLSN, min(last, log.lastLSN))
        if role == .primary {
            maybeCommit()
        } else {
            emitCommit()
            if let ack = pendingAck, ack.primary == primaryID, ack.term == hardState.term, role == .follower {
                let match = min(ack.match, durableLSN)
                if match == ack.match { pendingAck = nil }
                send(Message(from: id, to: ack.primary, term: hardState.term,
                             body: .appendResponse(AppendResponse(success: true, matchLSN: match, lastLSN: log.lastLSN, round: ack.round))),
                     afterPersist: false)
            }
        }
    }

    // MARK: Reads that do not trust clocks

    /// ReadIndex: remember the commit LSN now, start a round, and answer once a majority
    /// acknowledged that round (so no newer primary existed when the read began).
    private mutating func readIndex(_ readID: UInt64) {
        guard role == .primary, commitLSN >= termStartLSN else {
            ready.readsFailed.append(readID)
            return
        }
        if config.quorumSize == 1 {
            ready.readsReady.append((readID, commitLSN))
            return
        }
        // The round that confirms it goes out when this step's Ready is taken (one round
        // for all the reads of a step).
        pendingReads.append((readID, commitLSN, round + 1))
        needsReadRound = true
    }

    private mutating func releaseReads(quorumRound: UInt64) {
        guard !pendingReads.isEmpty else { return }
        while let first = pendingReads.first, first.round <= quorumRound {
            ready.readsReady.append((first.id, first.lsn))
            pendingReads.removeFirst()
        }
    }

    // MARK: Switchover

    private mutating func startTransfer(to target: SiteID) {
        guard role == .primary, transfer == nil, target != id, config.site(target)?.role == .voter else {
            if role == .primary, transfer == nil {
                let reason = target == id ? "\(target) is already the primary" : "\(target) is not a voter of this cluster"
                ready.roleChanges.append(.switchoverAborted(to: target, reason: reason))
            }
            return
        }
        transfer = Transfer(target: target, deadline: now + config.timing.transferTimeout)
        // Give the lease up at once: no lease read from here on, and rounds sent before
        // now no longer count if the switchover is aborted.
        leaseUntil = now
        leaseFloorRound = round
        ready.roleChanges.append(.switchoverStarted(to: target))
        if let p = progress[target], p.match == log.lastLSN, durableLSN == log.lastLSN {
            transfer?.timeoutSent = true
            send(Message(from: id, to: target, term: hardState.term, body: .timeoutNow), afterPersist: false)
        } else {
            sendAppend(to: target, heartbeat: true)
        }
    }

    // MARK: Output

    private mutating func send(_ m: Message, afterPersist: Bool) {
        if afterPersist { ready.messagesAfterPersist.append(m) } else { ready.messages.append(m) }
    }

    private mutating func takeReady() -> Ready {
        if needsReadRound {
            needsReadRound = false
            if role == .primary { broadcastRound() }
        }
        if needsBroadcast && role == .primary {
            needsBroadcast = false
            for peer in progress.keys.sorted() { sendAppend(to: peer, heartbeat: false) }
        }
        if ready.hasStorageWork {
            storageSequence += 1
            ready.storageID = storageSequence
            pendingStorage.append((storageSequence, log.lastLSN))
        }
        let out = ready
        ready = Ready()
        return out
    }
}

extension CommitPolicy {
    var isAsync: Bool {
        if case .async = self { return true }
        return false
    }
}
