import CoreMetrics
import Foundation
import Prometheus
import Synchronization
import TandemCore
import TandemModel
import TandemNode
import TandemTransport

/// A site's metrics, through swift-metrics into a Prometheus registry of its own (so that
/// several sites in one process, as in the tests, keep theirs apart). Served on /metrics.
public final class SiteMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let factory: PrometheusMetricsFactory

    let electionsWon: CoreMetrics.Counter
    let stepDowns: CoreMetrics.Counter
    let switchovers: CoreMetrics.Counter
    let majorityLost: CoreMetrics.Counter
    let forwardedInCounter: CoreMetrics.Counter
    let forwardedOutCounter: CoreMetrics.Counter
    let fsyncTimer: CoreMetrics.Timer
    let commitTimer: CoreMetrics.Timer
    let primaryWaitTimer: CoreMetrics.Timer
    let writesPerProposal: CoreMetrics.Recorder
    /// Transport totals already counted (the transport keeps running totals; counters
    /// here advance by the difference at each scrape).
    private let seen = Mutex<(raw: Int, sent: Int, failures: [HandshakeFailure: Int], timeouts: [SiteID: Int])>((0, 0, [:], [:]))

    public init() {
        registry = PrometheusCollectorRegistry()
        var f = PrometheusMetricsFactory(registry: registry)
        let ms: [Duration] = [.microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
                              .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
                              .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10)]
        f.defaultDurationHistogramBuckets = ms
        f.valueHistogramBuckets["tandem_writes_per_proposal"] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        factory = f
        electionsWon = Counter(label: "tandem_elections_won_total", dimensions: [], factory: f)
        stepDowns = Counter(label: "tandem_step_downs_total", dimensions: [], factory: f)
        switchovers = Counter(label: "tandem_switchovers_total", dimensions: [], factory: f)
        majorityLost = Counter(label: "tandem_majority_lost_total", dimensions: [], factory: f)
        forwardedInCounter = Counter(label: "tandem_forwarded_requests_total", dimensions: [("direction", "received")], factory: f)
        forwardedOutCounter = Counter(label: "tandem_forwarded_requests_total", dimensions: [("direction", "sent")], factory: f)
        fsyncTimer = Timer(label: "tandem_fsync_seconds", dimensions: [], factory: f)
        commitTimer = Timer(label: "tandem_commit_seconds", dimensions: [], factory: f)
        primaryWaitTimer = Timer(label: "tandem_wait_for_primary_seconds", dimensions: [], factory: f)
        writesPerProposal = Recorder(label: "tandem_writes_per_proposal", dimensions: [], aggregate: true, factory: f)
    }

    /// For the runtime's `onProposal`: how many writes the primary proposed as one group.
    public func proposed(writes: Int) { writesPerProposal.record(writes) }

    func forwardedIn() { forwardedInCounter.increment() }
    func forwardedOut() { forwardedOutCounter.increment() }
    func waitedForPrimary(nanoseconds: UInt64) { primaryWaitTimer.recordNanoseconds(Int64(clamping: nanoseconds)) }
    func committed(nanoseconds: UInt64) { commitTimer.recordNanoseconds(Int64(clamping: nanoseconds)) }

    /// For the log's `fsyncObserver`.
    public func fsynced(nanoseconds: UInt64) { fsyncTimer.recordNanoseconds(Int64(clamping: nanoseconds)) }

    /// Counts a role change (the runtime's `onRoleChange`).
    public func roleChanged(_ change: RoleChange) {
        switch change {
        case .becamePrimary: electionsWon.increment()
        case .steppedDown: stepDowns.increment()
        case .switchoverStarted: switchovers.increment()
        case .lostMajority: majorityLost.increment()
        default: break
        }
    }

    /// The Prometheus text for a scrape: the gauges are read from the site now.
    /// `peers`: the configured peers (a per-peer counter starts at 0 for each).
    public func render(status s: SiteStatus, transport: TransportMetrics, now: UInt64, leaseLeftNanoseconds: UInt64,
                       peers: [SiteID] = []) -> [UInt8] {
        func gauge(_ label: String, _ value: Double, _ dims: [(String, String)] = []) {
            Gauge(label: label, dimensions: dims, factory: factory).record(value)
        }
        for r in CoreRole.allCases { gauge("tandem_role", s.role == r ? 1 : 0, [("role", r.rawValue)]) }
        gauge("tandem_term", Double(s.term.rawValue))
        gauge("tandem_lease_seconds_left", Double(leaseLeftNanoseconds) / 1e9)
        gauge("tandem_commit_lsn", Double(s.commitLSN.rawValue))
        gauge("tandem_applied_lsn", Double(s.appliedLSN.rawValue))
        gauge("tandem_replica_lag_seconds", Double(s.lagNanoseconds) / 1e9)
        gauge("tandem_degraded", s.holdsLease || s.followsLivePrimary ? 0 : 1)
        for (peer, v) in s.peers {
            let lag = s.commitLSN > v.matchLSN ? s.commitLSN.rawValue - v.matchLSN.rawValue : 0
            gauge("tandem_peer_lag_records", Double(lag), [("peer", peer.name)])
            gauge("tandem_peer_lag_seconds", Double(v.lagNanoseconds) / 1e9, [("peer", peer.name)])
            gauge("tandem_peer_last_contact_seconds", Double(v.sinceContactNanoseconds) / 1e9, [("peer", peer.name)])
        }
        // The totals are read under the same lock as what was last seen: two scrapes at
        // once must not each read, then store in the other order (what was seen would go
        // back, and the next scrape count the difference twice).
        let (dRaw, dSent, dFail, dTimeouts, timeouts) = seen.withLock { seen -> (Int, Int, [HandshakeFailure: Int], [SiteID: Int], [SiteID: Int]) in
            let bytes = transport.recordBytes
            let failures = transport.handshakeFailures
            let timeouts = transport.peerTimeouts
            var d: [HandshakeFailure: Int] = [:]
            for (k, v) in failures where v > seen.failures[k, default: 0] { d[k] = v - seen.failures[k, default: 0] }
            var t: [SiteID: Int] = [:]
            for (k, v) in timeouts where v > seen.timeouts[k, default: 0] { t[k] = v - seen.timeouts[k, default: 0] }
            let out = (max(0, bytes.recordBytesRaw - seen.raw), max(0, bytes.recordBytesSent - seen.sent), d, t, timeouts)
            seen = (bytes.recordBytesRaw, bytes.recordBytesSent, failures, timeouts)
            return out
        }
        Counter(label: "tandem_replicated_bytes_total", dimensions: [("form", "raw")], factory: factory).increment(by: dRaw)
        Counter(label: "tandem_replicated_bytes_total", dimensions: [("form", "compressed")], factory: factory).increment(by: dSent)
        for reason in HandshakeFailure.allCases where reason != .crossedDial {
            Counter(label: "tandem_tls_handshake_failures_total", dimensions: [("reason", reason.rawValue)], factory: factory)
                .increment(by: dFail[reason] ?? 0)
        }
        for peer in Set(peers).union(timeouts.keys) {
            Counter(label: "tandem_peer_timeouts_total", dimensions: [("peer", peer.name)], factory: factory)
                .increment(by: dTimeouts[peer] ?? 0)
        }
        gauge("tandem_compression_ratio", transport.compressionRatio)
        return registry.emitToBuffer()
    }
}
