import Foundation
import Hummingbird
import NIOCore
import TandemCore
import TandemModel
import TandemNode

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

/// A replica-lag threshold: a number of records (`1000`) for now. Bytes (`16MB`) and
/// times (`500ms`) need the primary's byte and time positions, which replicas do not
/// receive yet; they are refused with a clear error rather than guessed.
public struct LagThreshold: Sendable, Equatable {
    public var records: UInt64

    public init(records: UInt64) { self.records = records }

    public static func parse(_ text: String) -> Result<LagThreshold, ProbeError> {
        let t = text.trimmingCharacters(in: .whitespaces)
        if let n = UInt64(t) { return .success(LagThreshold(records: n)) }
        if t.lowercased().hasSuffix("records"), let n = UInt64(t.dropLast("records".count).trimmingCharacters(in: .whitespaces)) {
            return .success(LagThreshold(records: n))
        }
        return .failure(ProbeError(message: "lag must be a number of records, like ?lag=1000 (got \"\(text)\")"))
    }
}

public struct ProbeError: Error, Sendable {
    public let message: String
}

/// The answer to a probe: pass or fail, and a small JSON body (never patient data).
public func evaluate(_ probe: Probe, status s: SiteStatus, lag: LagThreshold, site: SiteID) -> (pass: Bool, body: [String: Any]) {
    let lagRecords = s.commitLSN > s.appliedLSN ? s.commitLSN.rawValue - s.appliedLSN.rawValue : 0
    let replicaOK = !s.failed && s.role != .primary && s.followsLivePrimary && lagRecords <= lag.records
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
        "lag_records": lagRecords, "state": s.failed ? "failed" : "running",
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
/// status only, as HAProxy's `option httpchk` sends) and /status.
public func makeRouter(runtime: SiteRuntime, site: SiteID, defaultLag: LagThreshold,
                       sites: [SiteDescriptor]) -> Router<BasicRequestContext> {
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
    router.get("status") { _, _ in
        let s = runtime.status
        let connected = Set(runtime.transport.connectedPeers)
        let others: [[String: Any]] = sites.filter { $0.id != site }.map {
            ["id": $0.id.name, "domain": $0.domain.name, "role": $0.role.rawValue, "reachable": connected.contains($0.id)]
        }
        var votesByDomain: [String: Int] = [:]
        for d in sites { votesByDomain[d.domain.name, default: 0] += 1 }
        let body: [String: Any] = [
            "site": [
                "id": site.name, "failure_domain": sites.first { $0.id == site }?.domain.name ?? "", "role": s.role.rawValue,
                "term": s.term.rawValue, "primary": s.primary?.name ?? NSNull(), "holds_lease": s.holdsLease,
                "commit_lsn": s.commitLSN.rawValue, "applied_lsn": s.appliedLSN.rawValue,
                "log_first_lsn": s.logFirstLSN.rawValue, "log_last_lsn": s.logLastLSN.rawValue, "degraded": !(s.holdsLease || s.followsLivePrimary),
            ] as [String: Any],
            "sites": others,
            "placement": ["votes_by_failure_domain": votesByDomain,
                          "warnings": ClusterConfig(sites: sites).placementWarnings] as [String: Any],
        ]
        return json(body, status: .ok)
    }
    return router
}

/// Runs the HTTP server until the task is cancelled.
public func runHTTP(router: Router<BasicRequestContext>, host: String, port: Int) async throws {
    let app = Application(router: router, configuration: .init(address: .hostname(host, port: port), serverName: "tandemd"))
    try await app.runService(gracefulShutdownSignals: [])
}
