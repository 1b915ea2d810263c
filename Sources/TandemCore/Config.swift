import TandemModel

/// A site's name, unique in the cluster (for example `sbg`, `gra`, `rbx`, `witness`).
public struct SiteID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public let name: String
    public init(_ name: String) { self.name = name }
    public init(stringLiteral value: String) { name = value }
    public static func < (a: SiteID, b: SiteID) -> Bool { a.name < b.name }
    public var description: String { name }
}

/// A failure domain: a campus whose sites can all be lost together (Strasbourg's SBG1 to
/// SBG4 stood on one campus and all went down in 2021).
public struct FailureDomain: Hashable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public let name: String
    public init(_ name: String) { self.name = name }
    public init(stringLiteral value: String) { name = value }
    public var description: String { name }
}

/// What a site does in the cluster.
public enum SiteRole: String, Sendable, Codable {
    /// A full replica: stores the log, keeps the database, can become primary.
    case voter
    /// Votes and stores the log, keeps no database, never becomes primary. Two
    /// datacenters plus a small witness at a third place survive the loss of either.
    case witness
}

/// One member of the cluster.
public struct SiteDescriptor: Hashable, Sendable {
    public var id: SiteID
    public var domain: FailureDomain
    public var role: SiteRole

    public init(id: SiteID, domain: FailureDomain, role: SiteRole = .voter) {
        self.id = id
        self.domain = domain
        self.role = role
    }
}

/// When a write counts as committed.
public enum CommitPolicy: Hashable, Sendable, CustomStringConvertible {
    /// Durable on a majority of the voting sites (voters and witnesses).
    case majority
    /// Durable on a majority that includes a site outside the primary's failure domain:
    /// losing the primary's whole campus loses no committed write.
    case majorityTwoDomains
    /// Committed once durable on the primary; replicas may trail by at most
    /// `maxLagRecords` (new writes wait beyond that). Losing the primary may lose up to
    /// that many committed writes: the documented loss window.
    case async(maxLagRecords: UInt64)

    public var description: String {
        switch self {
        case .majority: "majority"
        case .majorityTwoDomains: "majority-two-domains"
        case let .async(lag): "async(max lag \(lag) records)"
        }
    }
}

/// Durations in nanoseconds of a site's own monotonic clock.
public typealias Nanoseconds = UInt64

public extension Nanoseconds {
    static func milliseconds(_ ms: Double) -> Nanoseconds { Nanoseconds(ms * 1_000_000) }
    static func seconds(_ s: Double) -> Nanoseconds { Nanoseconds(s * 1_000_000_000) }
}

/// Timing settings and the relations between them (checked by `validate`).
public struct Timing: Hashable, Sendable {
    /// How long a majority's grant keeps a primary in office. Default 2 s.
    public var leaseDuration: Nanoseconds = .seconds(2)
    /// How often the primary sends a round (append or heartbeat). At most a third of the
    /// lease, so two lost rounds do not lose the lease. Default 500 ms.
    public var heartbeatInterval: Nanoseconds = .milliseconds(500)
    /// Bound on the relative rate difference of two sites' clocks. Default 1% (crystal
    /// error plus NTP slew measure about 0.2%).
    public var driftBound: Double = 0.01
    /// Random extra wait, from 0 to this, before a follower starts an election once its
    /// promise has run out: avoids split votes. Default 300 ms.
    public var electionJitter: Nanoseconds = .milliseconds(300)
    /// How long a switchover may take before it is aborted. Default 4 s.
    public var transferTimeout: Nanoseconds = .seconds(4)

    public init() {}

    /// How long a follower, after hearing from the primary, refuses to vote for anyone
    /// else, on its own clock.
    public var promiseDuration: Nanoseconds { leaseDuration }

    /// How long after sending a round that a majority acknowledged the primary may treat
    /// its lease as valid, on its own clock: the follower's promise lasts at least
    /// L/(1+ρ) real time from receipt, and the primary's clock may run slow by (1-ρ), so
    /// the primary stops at L(1-ρ)/(1+ρ).
    public var primaryLeaseDuration: Nanoseconds {
        Nanoseconds(Double(leaseDuration) * (1 - driftBound) / (1 + driftBound))
    }

    public func validate() throws(ConfigError) {
        guard leaseDuration >= .milliseconds(10) else { throw .invalid("lease_duration", "at least 10 ms") }
        guard heartbeatInterval > 0, heartbeatInterval * 3 <= leaseDuration else {
            throw .invalid("heartbeat_interval", "at most a third of lease_duration (\(leaseDuration / 1_000_000) ms)")
        }
        guard driftBound > 0, driftBound < 0.1 else { throw .invalid("drift_bound", "between 0 and 0.1 (0.01 is 1%)") }
        guard electionJitter > 0 else { throw .invalid("election_jitter", "greater than zero") }
        guard transferTimeout >= leaseDuration else { throw .invalid("transfer_timeout", "at least lease_duration") }
    }
}

/// Budgets that bound memory and bytes in flight.
public struct Limits: Hashable, Sendable {
    /// Payload bytes sent to one peer and not yet acknowledged.
    public var maxInflightBytesPerPeer: Int = 8 << 20
    /// Append messages sent to one peer and not yet acknowledged.
    public var maxInflightMessagesPerPeer: Int = 64
    /// Payload bytes in one append message (at least one record is always sent).
    public var maxMessageBytes: Int = 1 << 20
    /// Recent records kept in memory for sending; older ones are read from the log.
    public var maxCachedBytes: Int = 64 << 20
    /// Records proposed but not yet committed on the primary; proposals beyond wait.
    public var maxUncommittedRecords: Int = 100_000

    public init() {}

    public func validate() throws(ConfigError) {
        guard maxInflightBytesPerPeer >= maxMessageBytes else {
            throw .invalid("max_inflight_bytes_per_peer", "at least max_message_bytes (\(maxMessageBytes))")
        }
        guard maxInflightMessagesPerPeer >= 1 else { throw .invalid("max_inflight_messages_per_peer", "at least 1") }
        guard maxMessageBytes >= 1024 else { throw .invalid("max_message_bytes", "at least 1024") }
        guard maxCachedBytes >= maxMessageBytes else { throw .invalid("max_cached_bytes", "at least max_message_bytes") }
        guard maxUncommittedRecords >= 1 else { throw .invalid("max_uncommitted_records", "at least 1") }
    }
}

/// The cluster as every site must see it.
public struct ClusterConfig: Hashable, Sendable {
    public var sites: [SiteDescriptor]
    public var commitPolicy: CommitPolicy
    public var timing: Timing
    public var limits: Limits

    public init(sites: [SiteDescriptor], commitPolicy: CommitPolicy = .majority, timing: Timing = Timing(), limits: Limits = Limits()) {
        self.sites = sites
        self.commitPolicy = commitPolicy
        self.timing = timing
        self.limits = limits
    }

    public func site(_ id: SiteID) -> SiteDescriptor? { sites.first { $0.id == id } }
    /// Sites that vote: voters and witnesses.
    public var votingSites: [SiteDescriptor] { sites }
    public var quorumSize: Int { sites.count / 2 + 1 }

    public func validate() throws(ConfigError) {
        guard !sites.isEmpty else { throw .invalid("sites", "at least one site") }
        guard Set(sites.map(\.id)).count == sites.count else { throw .invalid("sites", "unique site ids") }
        guard sites.contains(where: { $0.role == .voter }) else { throw .invalid("sites", "at least one voter") }
        if commitPolicy == .majorityTwoDomains {
            guard Set(sites.map(\.domain)).count >= 2 else {
                throw .invalid("commit_policy", "majority-two-domains needs sites in at least two failure domains")
            }
        }
        try timing.validate()
        try limits.validate()
    }

    /// Warnings about where the data and the votes live (the Strasbourg lesson).
    public var placementWarnings: [String] {
        var out: [String] = []
        var votesByDomain: [FailureDomain: Int] = [:]
        for s in sites { votesByDomain[s.domain, default: 0] += 1 }
        for (domain, votes) in votesByDomain.sorted(by: { $0.key.name < $1.key.name }) where votes >= quorumSize {
            out.append("failure domain \(domain) holds \(votes) of \(sites.count) votes, a majority: losing it stops the cluster")
        }
        if Set(sites.filter { $0.role == .voter }.map(\.domain)).count < 2 {
            out.append("every voter stands in one failure domain: losing it loses every copy of the database")
        }
        return out
    }
}

/// A setting that does not hold, with its key and what was expected.
public enum ConfigError: Error, Equatable, CustomStringConvertible, Sendable {
    case invalid(_ key: String, _ expected: String)
    public var description: String {
        switch self {
        case let .invalid(key, expected): "\(key): expected \(expected)"
        }
    }
}
