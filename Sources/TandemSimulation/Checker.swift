import TandemCore
import TandemModel

/// The invariants, kept apart from the system they check. The simulator reports what
/// happens; the checker decides whether it was allowed.
struct Checker {
    struct Violation: Sendable {
        var time: VirtualTime
        var invariant: String
        var detail: String
    }

    let allowLeaseOverlap: Bool
    let asyncPolicy: Bool
    private(set) var violations: [Violation] = []

    /// The committed history: the record each LSN committed to, as first applied anywhere.
    private(set) var history: [LSN: LogRecord] = [:]
    /// The state hash after applying each LSN, as first seen.
    private var hashes: [LSN: UInt64] = [:]
    /// Writes acknowledged to clients: LSN → record.
    private(set) var acknowledged: [LSN: LogRecord] = [:]
    /// The primary of each term.
    private var primaries: [Term: SiteID] = [:]
    /// The highest term each site ever made durable.
    private var durableTerms: [SiteID: Term] = [:]

    init(allowLeaseOverlap: Bool, asyncPolicy: Bool) {
        self.allowLeaseOverlap = allowLeaseOverlap
        self.asyncPolicy = asyncPolicy
    }

    mutating func fail(_ t: VirtualTime, _ invariant: String, _ detail: String) {
        if violations.count < 20 { violations.append(Violation(time: t, invariant: invariant, detail: detail)) }
    }

    /// At no instant do two sites each hold a lease they believe valid.
    mutating func checkLeases(_ t: VirtualTime, holders: [SiteID]) {
        if holders.count > 1 && !allowLeaseOverlap {
            fail(t, "single-lease", "sites \(holders.map(\.name).joined(separator: " and ")) both hold a valid lease")
        }
    }

    /// A lease read must reflect every write acknowledged before it started.
    mutating func staleRead(_ t: VirtualTime, site: SiteID, applied: LSN, acknowledged: LSN) {
        // Under async commit a failover may lose acknowledged writes (the documented
        // window), so a later read cannot be held to them; losses are counted at the end.
        if !allowLeaseOverlap && !asyncPolicy {
            fail(t, "linearizable-read", "\(site) served a lease read at applied LSN \(applied) after LSN \(acknowledged) was acknowledged")
        }
    }

    /// At most one primary per term.
    mutating func becamePrimary(_ t: VirtualTime, site: SiteID, term: Term, log: LogView) {
        if let other = primaries[term], other != site {
            fail(t, "one-primary-per-term", "\(site) and \(other) were both primary in term \(term)")
        }
        primaries[term] = site
        // Leader completeness: the new primary holds every acknowledged write.
        guard !asyncPolicy else { return }
        for (lsn, record) in acknowledged.sorted(by: { $0.key < $1.key }) where lsn >= log.firstLSN {
            if log.term(at: lsn) != record.term {
                fail(t, "acknowledged-writes-kept", "\(site) became primary in term \(term) without acknowledged write \(lsn) (term \(record.term))")
                return
            }
        }
    }

    /// A site applied `record` and reached state hash `hash`: committed logs must be
    /// prefixes of one another, and equal applied LSNs mean equal states.
    mutating func applied(_ t: VirtualTime, site: SiteID, record: LogRecord, hash: UInt64) {
        if let known = history[record.lsn] {
            if known != record {
                if asyncPolicy {
                    // Under async commit a failover may drop the old primary's last writes:
                    // the documented loss window, counted at the end, not a violation.
                    history[record.lsn] = record
                    hashes = hashes.filter { $0.key < record.lsn }
                } else {
                    fail(t, "committed-prefix", "\(site) applied \(describe(record)) at LSN \(record.lsn) where \(describe(known)) was committed")
                }
            }
        } else {
            history[record.lsn] = record
        }
        if let h = hashes[record.lsn] {
            if h != hash { fail(t, "equal-state", "\(site) has state hash \(h) ≠ \(hash) at applied LSN \(record.lsn)") }
        } else {
            hashes[record.lsn] = hash
        }
    }

    /// A site installed a snapshot of state `hash` at `lsn`.
    mutating func installedSnapshot(_ t: VirtualTime, site: SiteID, lsn: LSN, hash: UInt64) {
        if let h = hashes[lsn], h != hash { fail(t, "equal-state", "\(site) installed a snapshot at \(lsn) whose state differs") }
    }

    /// A write was acknowledged to its client.
    mutating func acknowledge(_ t: VirtualTime, record: LogRecord) {
        acknowledged[record.lsn] = record
        if let known = history[record.lsn], known != record, !asyncPolicy {
            fail(t, "acknowledged-writes-kept", "write acknowledged at LSN \(record.lsn) differs from the committed record there")
        }
    }

    /// A write acknowledged by a primary that had been superseded: the newest primary's
    /// log must hold it, or the stale primary's write got through.
    mutating func staleAcknowledgement(_ t: VirtualTime, record: LogRecord, newestPrimary: SiteID, newestTerm: Term, termThere: Term?) {
        guard !asyncPolicy, termThere != record.term else { return }
        fail(t, "stale-primary-write", "a write of term \(record.term) at LSN \(record.lsn) was acknowledged while \(newestPrimary) (term \(newestTerm)) holds \(termThere.map { "term \($0)" } ?? "nothing") there")
    }

    /// Witnesses keep no database: their logs are compared with the committed history.
    mutating func witnessLog(_ t: VirtualTime, site: SiteID, records: [LogRecord], committedThrough: LSN) {
        for r in records where r.lsn <= committedThrough {
            if let known = history[r.lsn], known != r, !asyncPolicy {
                fail(t, "committed-prefix", "witness \(site) holds \(r.kind)@t\(r.term) at LSN \(r.lsn) where \(known.kind)@t\(known.term) was committed")
                return
            }
        }
    }

    /// A site's disk was replaced by an empty one: its terms start again from zero.
    mutating func diskLost(site: SiteID) { durableTerms[site] = nil }

    /// Terms never go backwards across restarts.
    mutating func persistedTerm(_ t: VirtualTime, site: SiteID, term: Term) {
        if let before = durableTerms[site], term < before {
            fail(t, "terms-monotonic", "\(site) persisted term \(term) after term \(before)")
        }
        durableTerms[site] = max(durableTerms[site] ?? .zero, term)
    }

    /// At the end: acknowledged writes missing from the committed history.
    func lostAcknowledged(finalHistory: [LSN: LogRecord]) -> Int {
        acknowledged.reduce(0) { $0 + (finalHistory[$1.key] == $1.value ? 0 : 1) }
    }

    private func describe(_ r: LogRecord) -> String { "\(r.kind)@t\(r.term)" }
}
