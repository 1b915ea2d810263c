import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import TandemCore
import TandemModel
import TandemNode
import TandemTransport

/// What a load balancer's health check learns, with Patroni's meaning of 200 and 503.
public enum Probe: String, CaseIterable, Sendable {
    /// The daemon runs and its storage is sound.
    case health
    /// The process answers (for orchestrators).
    case liveness
    /// Ready to serve: primary with a lease, or a replica following a live primary.
    case readiness
    /// Only on the site holding a valid lease. Aliases: leader, read-write.
    case primary
    /// Holds the database, is not primary, follows a live primary, lag within `?lag=`.
    case replica
    /// The primary, or a site that would answer 200 on /replica.
    case readOnly = "read-only"

    /// The paths that answer this probe.
    public var paths: [String] {
        switch self {
        case .primary: ["primary", "leader", "read-write"]
        default: [rawValue]
        }
    }
}

/// A replica-lag threshold: records (`1000`, `1000records`), or a time (`500ms`, `2s`):
/// how long ago the replica last held everything its primary had committed. Bytes
/// (`16MB`) are refused with a clear error: a replica does not learn the primary's byte
/// position, and a guess would make the probe lie.
public struct LagThreshold: Sendable, Equatable {
    public var records: UInt64?
    public var nanoseconds: UInt64?

    public init(records: UInt64? = nil, nanoseconds: UInt64? = nil) {
        self.records = records
        self.nanoseconds = nanoseconds
    }

    public static func parse(_ text: String) -> Result<LagThreshold, ProbeError> {
        let t = text.trimmingCharacters(in: .whitespaces).lowercased()
        // A number with a unit, scaled; nil if absent, negative, or beyond a day in
        // nanoseconds (or 10^12 records): never a conversion that could trap.
        func number(_ suffix: String, scale: Double, limit: Double) -> UInt64? {
            guard t.hasSuffix(suffix), let x = Double(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)),
                  x.isFinite, x >= 0, x * scale <= limit else { return nil }
            return UInt64(x * scale)
        }
        let day = 86_400e9
        if let n = UInt64(t) { return .success(LagThreshold(records: n)) }
        if let n = number("records", scale: 1, limit: 1e12) { return .success(LagThreshold(records: n)) }
        if let ns = number("ms", scale: 1e6, limit: day) { return .success(LagThreshold(nanoseconds: ns)) }
        if let ns = number("min", scale: 60e9, limit: day) { return .success(LagThreshold(nanoseconds: ns)) }
        if let ns = number("s", scale: 1e9, limit: day) { return .success(LagThreshold(nanoseconds: ns)) }
        if t.hasSuffix("b") {
            return .failure(ProbeError(message: "lag in bytes (\"\(text)\") is not supported: give records (?lag=1000) or a time (?lag=500ms)"))
        }
        return .failure(ProbeError(message: "lag must be a number of records (?lag=1000) or a time of at most a day (?lag=500ms, ?lag=2s), got \"\(text)\""))
    }

    func allows(records: UInt64, nanoseconds: UInt64) -> Bool {
        (self.records.map { records <= $0 } ?? true) && (self.nanoseconds.map { nanoseconds <= $0 } ?? true)
    }
}

public struct ProbeError: Error, Sendable {
    public let message: String
}

/// The answer to a probe: pass or fail, and a small JSON body (never patient data).
public func evaluate(_ probe: Probe, status s: SiteStatus, lag: LagThreshold, site: SiteID) -> (pass: Bool, body: [String: Any]) {
    let target = max(s.primaryCommitLSN, s.commitLSN)
    let lagRecords = target > s.appliedLSN ? target.rawValue - s.appliedLSN.rawValue : 0
    let replicaOK = !s.failed && s.role != .primary && s.followsLivePrimary && lag.allows(records: lagRecords, nanoseconds: s.lagNanoseconds)
    let pass: Bool = switch probe {
    case .health: !s.failed
    case .liveness: true
    case .readiness: !s.failed && (s.holdsLease || s.followsLivePrimary)
    case .primary: !s.failed && s.holdsLease
    case .replica: replicaOK
    case .readOnly: !s.failed && (s.holdsLease || replicaOK)
    }
    let body: [String: Any] = [
        "site": site.name, "role": s.role.rawValue, "term": s.term.rawValue, "primary": s.primary?.name ?? NSNull(),
        "holds_lease": s.holdsLease, "commit_lsn": s.commitLSN.rawValue, "applied_lsn": s.appliedLSN.rawValue,
        "lag_records": lagRecords, "lag_ms": Double(s.lagNanoseconds / 1000) / 1000, "state": s.failed ? "failed" : "running",
    ]
    return (pass, body)
}

/// A JSON answer. `bodyless`: HEAD (the length of the body a GET would get, no body) or
/// OPTIONS (an empty body), which is what HAProxy's checks send.
enum Bodyless { case none, head, options }

func json(_ object: [String: Any], status: HTTPResponse.Status, bodyless: Bodyless = .none) -> Response {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
    var headers = HTTPFields()
    headers[.contentType] = "application/json"
    headers[.cacheControl] = "no-store"
    switch bodyless {
    case .head:
        headers[.contentLength] = String(data.count)
        return Response(status: status, headers: headers)
    case .options:
        headers[.contentLength] = "0"
        return Response(status: status, headers: headers)
    case .none:
        break
    }
    return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
}

/// The site's HTTP routes: health probes (GET with a JSON body; HEAD and OPTIONS with the
/// status only, as HAProxy's `option httpchk` sends), /status and /metrics. The data API
/// under /v1 is served ahead of the router (`siteHTTPServer`).
public func makeRouter(runtime: SiteRuntime, site: SiteID, defaultLag: LagThreshold, sites: [SiteDescriptor],
                       metrics: SiteMetrics? = nil) -> Router<BasicRequestContext> {
    let router = Router()
    for probe in Probe.allCases {
        for path in probe.paths {
            @Sendable func answer(_ request: Request, bodyless: Bodyless) -> Response {
                var lag = defaultLag
                if let text = request.uri.queryParameters.get("lag") {
                    switch LagThreshold.parse(text) {
                    case let .success(l): lag = l
                    case let .failure(e): return json(["error": ["code": "bad_lag", "message": e.message]], status: .badRequest, bodyless: bodyless)
                    }
                }
                let (pass, body) = evaluate(probe, status: runtime.status, lag: lag, site: site)
                return json(body, status: pass ? .ok : .serviceUnavailable, bodyless: bodyless)
            }
            router.get(RouterPath(stringLiteral: path)) { request, _ in answer(request, bodyless: .none) }
            router.head(RouterPath(stringLiteral: path)) { request, _ in answer(request, bodyless: .head) }
            router.on(RouterPath(stringLiteral: path), method: .options) { request, _ in answer(request, bodyless: .options) }
        }
    }
    router.get("status") { _, _ in json(statusDocument(runtime: runtime, site: site, sites: sites), status: .ok) }
    if let metrics {
        router.get("metrics") { _, _ in
            let s = runtime.status
            let text = metrics.render(status: s, transport: runtime.transport.metrics, now: SiteRuntime.now, leaseLeftNanoseconds: s.leaseLeftNanoseconds,
                                      peers: sites.map(\.id).filter { $0 != site })
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
            return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: text)))
        }
    }
    return router
}

/// GET /status: this site, every other site as seen from here, and where the data lives.
public func statusDocument(runtime: SiteRuntime, site: SiteID, sites: [SiteDescriptor]) -> [String: Any] {
    let s = runtime.status
    let connected = Set(runtime.transport.connectedPeers)
    let domains = Dictionary(uniqueKeysWithValues: sites.map { ($0.id, $0.domain) })
    let me = sites.first { $0.id == site }
    let others: [[String: Any]] = sites.filter { $0.id != site }.map { d in
        var o: [String: Any] = ["id": d.id.name, "failure_domain": d.domain.name, "role": d.role.rawValue,
                                "is_primary": s.primary == d.id, "reachable": connected.contains(d.id)]
        if let p = s.peers[d.id] {
            o["match_lsn"] = p.matchLSN.rawValue
            o["lag_records"] = s.commitLSN > p.matchLSN ? s.commitLSN.rawValue - p.matchLSN.rawValue : 0
            o["lag_ms"] = Double(p.lagNanoseconds / 1000) / 1000
            o["last_contact_ms_ago"] = Double(p.sinceContactNanoseconds / 1000) / 1000
        }
        return o
    }
    var votesByDomain: [String: Int] = [:]
    for d in sites where d.role == .voter || d.role == .witness { votesByDomain[d.domain.name, default: 0] += 1 }
    var placement: [String: Any] = ["votes_by_failure_domain": votesByDomain]
    var warnings = ClusterConfig(sites: sites).placementWarnings
    if s.role == .primary {
        // Who holds every record up to the commit LSN: this site and each peer whose log matches that far.
        var holders = [site]
        for (peer, p) in s.peers where p.matchLSN >= s.commitLSN { holders.append(peer) }
        holders.sort()
        let holderDomains = Set(holders.compactMap { domains[$0]?.name }).sorted()
        placement["commit_lsn"] = s.commitLSN.rawValue
        placement["sites_holding_commit_lsn"] = holders.map(\.name)
        placement["failure_domains_holding_commit_lsn"] = holderDomains
        if holderDomains.count < 2 {
            warnings.append("every copy of the writes through LSN \(s.commitLSN) stands in one failure domain (\(holderDomains.joined(separator: ", "))): losing it loses them")
        }
    } else {
        placement["note"] = "the primary (\(s.primary?.name ?? "none known")) knows which sites hold the latest writes; ask its /status"
    }
    placement["warnings"] = warnings
    let target = max(s.primaryCommitLSN, s.commitLSN)
    return [
        "site": [
            "id": site.name, "failure_domain": me?.domain.name ?? "", "role": s.role.rawValue,
            "term": s.term.rawValue, "primary": s.primary?.name ?? NSNull(), "holds_lease": s.holdsLease,
            "lease_ms_left": Double(s.leaseLeftNanoseconds / 1000) / 1000,
            "commit_lsn": s.commitLSN.rawValue, "applied_lsn": s.appliedLSN.rawValue,
            "lag_records": target > s.appliedLSN ? target.rawValue - s.appliedLSN.rawValue : 0,
            "lag_ms": Double(s.lagNanoseconds / 1000) / 1000,
            "log_first_lsn": s.logFirstLSN.rawValue, "log_last_lsn": s.logLastLSN.rawValue,
            "degraded": !s.failed && !(s.holdsLease || s.followsLivePrimary), "failed": s.failed,
        ] as [String: Any],
        "sites": others,
        "placement": placement,
    ]
}

/// Runs the HTTP server until the task is cancelled (tests; tandemd runs the application
/// in its service group). Cancellation makes the server log errors: only critical ones show.
public func runHTTP(router: Router<BasicRequestContext>, api: DataAPI? = nil, host: String, port: Int) async throws {
    var logger = Logger(label: "tandem-http")
    logger.logLevel = .critical
    let app = Application(router: router, server: siteHTTPServer(api: api),
                          configuration: .init(address: .hostname(host, port: port), serverName: "tandemd"), logger: logger)
    try await app.runService(gracefulShutdownSignals: [])
}
