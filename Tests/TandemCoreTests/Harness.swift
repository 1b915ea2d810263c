import TandemCore
import TandemModel

/// A tiny driver for core tests: sites with a shared virtual clock, a mailbox, instant
/// durable storage, and manual control over which messages are delivered.
struct Cluster {
    var cores: [SiteID: Core] = [:]
    var mailbox: [Message] = []
    var now: Instant = 1_000_000_000
    var entropy: UInt64 = 7
    var down: Set<SiteID> = []
    /// Directed links that drop messages ("a>b").
    var cut: Set<String> = []
    var committed: [SiteID: LSN] = [:]
    var roleChanges: [(SiteID, RoleChange)] = []

    init(_ ids: [String], policy: CommitPolicy = .majority, domains: [String]? = nil, witness: String? = nil, maxUncommitted: Int? = nil) throws {
        let sites = ids.enumerated().map { i, id in
            SiteDescriptor(id: SiteID(id), domain: FailureDomain(domains?[i] ?? "dc-\(id)"), role: id == witness ? .witness : .voter)
        }
        var config = ClusterConfig(sites: sites, commitPolicy: policy)
        if let maxUncommitted { config.limits.maxUncommittedRecords = maxUncommitted }
        for s in sites {
            cores[s.id] = try Core(id: s.id, config: config, hardState: HardState(), log: LogView(), now: now, entropy: entropy)
        }
    }

    var config: ClusterConfig { cores.values.first!.config }

    mutating func perform(_ id: SiteID, _ ready: Ready) {
        // Storage is instant and durable here: report it at once.
        for m in ready.messagesAfterPersist + ready.messages where !cut.contains("\(m.from)>\(m.to)") { mailbox.append(m) }
        for c in ready.roleChanges { roleChanges.append((id, c)) }
        if let c = ready.committedThrough { committed[id] = c }
        if let storageID = ready.storageID, var core = cores[id] {
            let more = core.step(.persisted(storageID: storageID), at: now, entropy: entropy)
            cores[id] = core
            perform(id, more)
        }
    }

    mutating func step(_ id: SiteID, _ event: CoreEvent) {
        guard !down.contains(id), var core = cores[id] else { return }
        entropy = entropy &* 6364136223846793005 &+ 1442695040888963407
        let ready = core.step(event, at: now, entropy: entropy >> 33)
        cores[id] = core
        perform(id, ready)
    }

    /// Delivers every queued message (and what they cause) until the mailbox is empty.
    mutating func deliverAll(limit: Int = 10_000) {
        var n = 0
        while !mailbox.isEmpty && n < limit {
            let m = mailbox.removeFirst()
            n += 1
            if down.contains(m.to) || cut.contains("\(m.from)>\(m.to)") { continue }
            step(m.to, .message(m))
        }
    }

    /// Advances time in 10 ms ticks, delivering messages after each.
    mutating func run(milliseconds: Int) {
        for _ in 0..<(milliseconds / 10) {
            now += 10_000_000
            for id in cores.keys.sorted() { step(id, .tick) }
            deliverAll()
        }
    }

    mutating func propose(_ id: SiteID, _ text: String) throws -> LSN {
        guard var core = cores[id] else { throw ProposalError.notPrimary(knownPrimary: nil) }
        let (lsn, ready) = try core.propose(kind: .changeset, payload: Array(text.utf8), at: now)
        cores[id] = core
        perform(id, ready)
        return lsn
    }

    var primaries: [SiteID] { cores.filter { !down.contains($0.key) && $0.value.role == .primary }.map(\.key).sorted() }
    var leaseHolders: [SiteID] { cores.filter { !down.contains($0.key) && $0.value.canServeLeaseRead(at: now) }.map(\.key).sorted() }
}
