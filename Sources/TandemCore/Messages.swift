import TandemModel

/// A local monotonic time, in nanoseconds of the site's own clock. Passed into the core
/// with every input: the core never reads a clock.
public typealias Instant = UInt64

/// A message between two sites. Every message carries its sender's term: a higher term
/// makes the receiver step down, a lower one is refused (terms fence deposed primaries).
public struct Message: Hashable, Sendable, CustomStringConvertible {
    public var from: SiteID
    public var to: SiteID
    public var term: Term
    public var body: Body

    public init(from: SiteID, to: SiteID, term: Term, body: Body) {
        self.from = from
        self.to = to
        self.term = term
        self.body = body
    }

    public enum Body: Hashable, Sendable {
        /// "Would you vote for me in the next term?" Changes nothing at the receiver.
        case preVote(lastLSN: LSN, lastTerm: Term)
        /// `lastLSN`/`lastTerm`: as for a vote, so a pre-candidate sees who is ahead.
        case preVoteResponse(granted: Bool, lastLSN: LSN, lastTerm: Term)
        /// A vote request. `transfer` marks a switchover the primary started: voters may
        /// grant it although they promised the (stepping-down) primary their support.
        case vote(lastLSN: LSN, lastTerm: Term, transfer: Bool)
        /// `lastLSN`/`lastTerm` let a candidate see that a voter (a witness) holds records
        /// it lacks, and fetch them.
        case voteResponse(granted: Bool, lastLSN: LSN, lastTerm: Term)
        case append(Append)
        case appendResponse(AppendResponse)
        /// From the primary to a switchover's target: campaign now.
        case timeoutNow
        /// A candidate asks a site that is ahead for the records after `prevLSN`.
        case fetch(prevLSN: LSN, prevTerm: Term)
        case fetchResponse(FetchResponse)
    }

    public var description: String {
        let b: String = switch body {
        case let .preVote(l, t): "preVote(last \(l)@\(t))"
        case let .preVoteResponse(g, l, t): "preVoteResponse(\(g), last \(l)@\(t))"
        case let .vote(l, t, x): "vote(last \(l)@\(t)\(x ? ", transfer" : ""))"
        case let .voteResponse(g, l, t): "voteResponse(\(g), last \(l)@\(t))"
        case let .append(a): "append(prev \(a.prevLSN)@\(a.prevTerm), \(a.records.count) records, commit \(a.commitLSN), round \(a.round))"
        case let .appendResponse(r): "appendResponse(\(r.success), match \(r.matchLSN), last \(r.lastLSN), round \(r.round))"
        case .timeoutNow: "timeoutNow"
        case let .fetch(l, t): "fetch(after \(l)@\(t))"
        case let .fetchResponse(r): "fetchResponse(\(r.success), prev \(r.prevLSN), \(r.records.count) records)"
        }
        return "\(from)→\(to) t\(term) \(b)"
    }
}

/// Records for a follower, and the heartbeat that renews the primary's lease.
public struct Append: Hashable, Sendable {
    public var prevLSN: LSN
    public var prevTerm: Term
    public var records: [LogRecord]
    public var commitLSN: LSN
    /// The lease round this message belongs to; its acknowledgement names it.
    public var round: UInt64

    public init(prevLSN: LSN, prevTerm: Term, records: [LogRecord], commitLSN: LSN, round: UInt64) {
        self.prevLSN = prevLSN
        self.prevTerm = prevTerm
        self.records = records
        self.commitLSN = commitLSN
        self.round = round
    }
}

public struct AppendResponse: Hashable, Sendable {
    /// Whether the records were accepted (the log matched at prevLSN).
    public var success: Bool
    /// On success, the last LSN now known to match the primary's log. The response is
    /// sent only once those records are durable.
    public var matchLSN: LSN
    /// The follower's last LSN: on a refusal, where the primary should look next.
    public var lastLSN: LSN
    public var round: UInt64

    public init(success: Bool, matchLSN: LSN, lastLSN: LSN, round: UInt64) {
        self.success = success
        self.matchLSN = matchLSN
        self.lastLSN = lastLSN
        self.round = round
    }
}

public struct FetchResponse: Hashable, Sendable {
    public var success: Bool
    public var prevLSN: LSN
    /// The term at prevLSN the responder matched: the fetcher checks it still holds.
    public var prevTerm: Term
    public var records: [LogRecord]
    /// The responder's last LSN (where to retry after a refusal).
    public var lastLSN: LSN

    public init(success: Bool, prevLSN: LSN, prevTerm: Term, records: [LogRecord], lastLSN: LSN) {
        self.success = success
        self.prevLSN = prevLSN
        self.prevTerm = prevTerm
        self.records = records
        self.lastLSN = lastLSN
    }
}

/// What must survive a crash for the election rules to hold: persisted before any
/// message that depends on it is sent.
public struct HardState: Hashable, Sendable {
    public var term: Term
    public var votedFor: SiteID?

    public init(term: Term = .zero, votedFor: SiteID? = nil) {
        self.term = term
        self.votedFor = votedFor
    }
}

/// A site's role as the core sees it.
public enum CoreRole: String, Hashable, Sendable, CaseIterable {
    case follower, preCandidate, candidate, primary
}

/// A change the operator or a hook wants to hear about.
public enum RoleChange: Hashable, Sendable {
    case becamePrimary(term: Term)
    case steppedDown(term: Term, reason: String)
    case lostMajority(term: Term)
    case regainedMajority(term: Term)
    case switchoverStarted(to: SiteID)
    case switchoverAborted(to: SiteID, reason: String)
}

/// A request to read records from the local log for a peer (older than the in-memory
/// cache). Completed by `CoreEvent.logRead`.
public struct LogReadRequest: Hashable, Sendable {
    public var peer: SiteID
    public var from: LSN
    public var maxBytes: Int
}

/// The inputs of the core.
public enum CoreEvent: Hashable, Sendable {
    case message(Message)
    /// Time passes (the driver calls it periodically, for example every 10 ms).
    case tick
    /// The storage work of the Ready with this id is durable.
    case persisted(storageID: UInt64)
    /// Records read from the local log for `peer`, answering a `LogReadRequest`.
    case logRead(peer: SiteID, records: [LogRecord])
    /// The local log no longer holds records up to `lsn` (a snapshot covers them).
    case compacted(through: LSN)
    /// A snapshot at `lsn` (record term `term`) was installed: the log restarts after it.
    case snapshotInstalled(lsn: LSN, term: Term)
    /// Start a switchover to `target`.
    case transferLeadership(to: SiteID)
    /// A linearizable read that does not trust clocks (etcd's ReadIndex): answered in
    /// `Ready.readsReady` with the commit LSN to wait for, once a majority has confirmed
    /// this site is still primary, or in `readsFailed`.
    case readIndex(id: UInt64)
}

/// Everything the core wants done after one input, in the order the driver must do it:
/// 1. persist `hardState`, then truncate the log after `truncateAfter`, then append
///    `append` (all durably); then report `.persisted(storageID:)`;
/// 2. send `messagesAfterPersist` only after step 1 is durable;
/// 3. send `messages` at once (they do not depend on local durability);
/// 4. apply committed records through `committedThrough`;
/// 5. serve `logReads`, hand `snapshotsNeeded` to the transport.
public struct Ready: Sendable {
    public var storageID: UInt64?
    public var hardState: HardState?
    public var truncateAfter: LSN?
    public var append: [LogRecord] = []
    public var messages: [Message] = []
    public var messagesAfterPersist: [Message] = []
    public var committedThrough: LSN?
    public var roleChanges: [RoleChange] = []
    public var logReads: [LogReadRequest] = []
    public var snapshotsNeeded: [SiteID] = []
    /// ReadIndex reads confirmed: serve each once the applied LSN reaches its LSN.
    public var readsReady: [(id: UInt64, lsn: LSN)] = []
    /// ReadIndex reads that cannot be confirmed here (not primary, or deposed).
    public var readsFailed: [UInt64] = []

    public init() {}

    public var hasStorageWork: Bool { hardState != nil || truncateAfter != nil || !append.isEmpty }
    public var isEmpty: Bool {
        !hasStorageWork && messages.isEmpty && messagesAfterPersist.isEmpty && committedThrough == nil
            && roleChanges.isEmpty && logReads.isEmpty && snapshotsNeeded.isEmpty && readsReady.isEmpty && readsFailed.isEmpty
    }
}

/// Why a proposal was refused.
public enum ProposalError: Error, Hashable, Sendable, CustomStringConvertible {
    case notPrimary(knownPrimary: SiteID?)
    case switchoverInProgress
    /// The primary has no valid lease (just elected, or cut off from the majority).
    case noLease
    case tooManyUncommitted(limit: Int)
    case replicasTooFarBehind(lagRecords: UInt64, limit: UInt64)

    public var description: String {
        switch self {
        case let .notPrimary(p): "this site is not the primary" + (p.map { " (the primary is \($0))" } ?? " (no primary known)")
        case .switchoverInProgress: "a switchover is in progress"
        case .noLease: "the primary holds no valid lease (just elected, or cut off from the majority)"
        case let .tooManyUncommitted(limit): "more than \(limit) records await commit"
        case let .replicasTooFarBehind(lag, limit): "replicas trail by \(lag) records, beyond the async limit of \(limit)"
        }
    }
}
