import Foundation
import TandemCore

/// A disaster scenario: topology, network, workload, a fault timeline and expectations.
/// Read from a JSON file in Simulations/; every key is documented in
/// Simulations/README.md, and an unknown key is an error (a typo must not pass silently).
public struct Scenario: Sendable {
    public var name: String
    public var description: String
    public var durationSeconds: Double
    public var sites: [SiteSpec]
    public var network: NetworkSpec
    public var commitPolicy: CommitPolicy
    public var timing: Timing
    public var disk: DiskSpec
    public var workload: WorkloadSpec
    public var faults: [Fault]
    public var expect: Expectations

    public struct SiteSpec: Sendable {
        public var id: String
        public var domain: String
        public var role: SiteRole
        /// Clock rate error in parts per million (+ runs fast).
        public var clockDriftPPM: Double
    }

    public struct NetworkSpec: Sendable {
        /// One-way latency in ms between failure domains ("sbg-gra": 6); same domain uses
        /// `sameDomainLatencyMS`, unknown pairs `defaultLatencyMS`.
        public var latencyMS: [String: Double]
        public var defaultLatencyMS: Double
        public var sameDomainLatencyMS: Double
        /// Extra random delay, 0 to this, per message (it also reorders them).
        public var jitterMS: Double
        public var loss: Double
        public var duplication: Double
    }

    public struct DiskSpec: Sendable {
        public var fsyncMS: Double
        public var fsyncJitterMS: Double
    }

    public struct WorkloadSpec: Sendable {
        public var writesPerSecond: Double
        /// Relative weights of the telehealth write kinds.
        public var bookings: Double
        public var cancellations: Double
        public var consultations: Double
        public var documents: Double
        public var documentBytes: Int
    }

    public struct Expectations: Sendable {
        /// After the last fault heals, a primary must exist within this many seconds.
        public var recoverWithinSeconds: Double
        /// Acknowledged writes that may be lost (0 except under `async`).
        public var maxLostAcknowledged: Int
        /// Two leases may overlap (only in a scenario whose clocks drift beyond the bound).
        public var allowLeaseOverlap: Bool
        /// Every site must end with the same applied state.
        public var converge: Bool
    }

    /// One fault at a point of the timeline.
    public struct Fault: Sendable {
        public var atSeconds: Double
        public var action: Action
    }

    public enum Action: Sendable, Hashable {
        case crash(site: String)
        case crashDomain(domain: String)
        case restart(site: String)
        /// The site dies with its disk; a later `restart` rebuilds it empty (`--rejoin`).
        case loseDisk(site: String)
        case restartDomain(domain: String)
        /// Cuts every link between the two groups (both ways unless `oneWay`).
        case partition(groups: [[String]], oneWay: Bool)
        case isolateDomain(domain: String)
        case heal
        case pause(site: String, seconds: Double)
        case clockDrift(site: String, ppm: Double)
        case slowDisk(site: String, fsyncMS: Double)
        case fsyncError(site: String)
        case diskFull(site: String)
        case diskFreed(site: String)
        case flapLink(a: String, b: String, periodSeconds: Double, untilSeconds: Double)
        case switchover(to: String)
        case crashPrimary
        case pausePrimary(seconds: Double)
        case isolatePrimary
        case stopWorkload
        case setLoss(Double)
    }
}

// MARK: - Loading

/// A scenario file that does not follow the format: the file, the key and what was expected.
public struct ScenarioError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let key: String
    public let expected: String
    public var description: String { "\(file): key \(key): expected \(expected)" }
}

extension Scenario {
    /// Reads and checks a scenario file.
    public static func load(path: String) throws(ScenarioError) -> Scenario {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ScenarioError(file: path, key: "(file)", expected: "a readable file")
        }
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: data) } catch {
            throw ScenarioError(file: path, key: "(document)", expected: "valid JSON (\(error.localizedDescription))")
        }
        var r = Reader(file: path)
        return try r.scenario(json)
    }

    public static func parse(json: String, file: String = "(inline)") throws(ScenarioError) -> Scenario {
        let obj: Any
        do { obj = try JSONSerialization.jsonObject(with: Data(json.utf8)) } catch {
            throw ScenarioError(file: file, key: "(document)", expected: "valid JSON (\(error.localizedDescription))")
        }
        var r = Reader(file: file)
        return try r.scenario(obj)
    }

    /// The cluster configuration the simulated sites run.
    public var clusterConfig: ClusterConfig {
        ClusterConfig(sites: sites.map { SiteDescriptor(id: SiteID($0.id), domain: FailureDomain($0.domain), role: $0.role) },
                      commitPolicy: commitPolicy, timing: timing)
    }
}

/// Walks the JSON with the key path at hand, so every error names it.
private struct Reader {
    let file: String

    func fail(_ key: String, _ expected: String) -> ScenarioError { ScenarioError(file: file, key: key, expected: expected) }

    func object(_ v: Any?, _ key: String, allowed: Set<String>) throws(ScenarioError) -> [String: Any] {
        guard let o = v as? [String: Any] else { throw fail(key, "an object") }
        for k in o.keys.sorted() where !allowed.contains(k) {
            throw fail(key.isEmpty ? k : "\(key).\(k)", "one of the known keys (\(allowed.sorted().joined(separator: ", ")))")
        }
        return o
    }

    func string(_ o: [String: Any], _ k: String, _ path: String, default d: String? = nil) throws(ScenarioError) -> String {
        guard let v = o[k] else {
            if let d { return d }
            throw fail(path + k, "a string (required)")
        }
        guard let s = v as? String, !s.isEmpty else { throw fail(path + k, "a non-empty string") }
        return s
    }

    func number(_ o: [String: Any], _ k: String, _ path: String, default d: Double? = nil, min: Double = 0, max: Double = .infinity) throws(ScenarioError) -> Double {
        guard let v = o[k] else {
            if let d { return d }
            throw fail(path + k, "a number (required)")
        }
        guard !isBool(v), let n = v as? NSNumber else { throw fail(path + k, "a number") }
        let x = n.doubleValue
        guard x >= min, x <= max else { throw fail(path + k, "a number between \(min) and \(max), got \(x)") }
        return x
    }

    func bool(_ o: [String: Any], _ k: String, _ path: String, default d: Bool) throws(ScenarioError) -> Bool {
        guard let v = o[k] else { return d }
        guard isBool(v), let b = v as? Bool else { throw fail(path + k, "true or false") }
        return b
    }

    /// JSON true/false, told apart from the numbers 1 and 0.
    func isBool(_ v: Any) -> Bool {
        if let n = v as? NSNumber { return String(cString: n.objCType) == "c" || type(of: v) == Bool.self }
        return v is Bool
    }

    mutating func scenario(_ json: Any) throws(ScenarioError) -> Scenario {
        let top = try object(json, "", allowed: ["name", "description", "duration_seconds", "sites", "network", "commit_policy",
                                                 "async_max_lag_records", "timing", "disk", "workload", "faults", "expect"])
        let name = try string(top, "name", "")
        let description = try string(top, "description", "", default: "")
        let duration = try number(top, "duration_seconds", "", min: 1, max: 86_400)
        guard let siteList = top["sites"] as? [Any], !siteList.isEmpty else { throw fail("sites", "a non-empty list of sites") }
        var sites: [Scenario.SiteSpec] = []
        for (i, s) in siteList.enumerated() {
            let path = "sites[\(i)]."
            let o = try object(s, "sites[\(i)]", allowed: ["id", "domain", "role", "clock_drift_ppm"])
            let roleText = try string(o, "role", path, default: "voter")
            guard let role = SiteRole(rawValue: roleText) else { throw fail(path + "role", "\"voter\" or \"witness\", got \"\(roleText)\"") }
            sites.append(.init(id: try string(o, "id", path), domain: try string(o, "domain", path), role: role,
                               clockDriftPPM: try number(o, "clock_drift_ppm", path, default: 0, min: -200_000, max: 200_000)))
        }
        guard Set(sites.map(\.id)).count == sites.count else { throw fail("sites", "unique site ids") }
        let ids = Set(sites.map(\.id))
        let domains = Set(sites.map(\.domain))

        let net = try object(top["network"] ?? [String: Any](), "network",
                             allowed: ["latency_ms", "default_latency_ms", "same_domain_latency_ms", "jitter_ms", "loss", "duplication"])
        var latency: [String: Double] = [:]
        if let l = net["latency_ms"] {
            guard let pairs = l as? [String: Any] else { throw fail("network.latency_ms", "an object of \"domainA-domainB\": milliseconds") }
            for (k, v) in pairs {
                let parts = k.split(separator: "-").map(String.init)
                guard parts.count == 2, domains.contains(parts[0]), domains.contains(parts[1]) else {
                    throw fail("network.latency_ms.\(k)", "a pair of configured failure domains, like \"sbg-gra\"")
                }
                guard let n = v as? NSNumber, n.doubleValue >= 0 else { throw fail("network.latency_ms.\(k)", "a number of milliseconds") }
                latency[k] = n.doubleValue
            }
        }
        let network = Scenario.NetworkSpec(
            latencyMS: latency,
            defaultLatencyMS: try number(net, "default_latency_ms", "network.", default: 5, max: 10_000),
            sameDomainLatencyMS: try number(net, "same_domain_latency_ms", "network.", default: 0.3, max: 10_000),
            jitterMS: try number(net, "jitter_ms", "network.", default: 1, max: 10_000),
            loss: try number(net, "loss", "network.", default: 0, max: 0.9),
            duplication: try number(net, "duplication", "network.", default: 0, max: 0.9))

        let policyText = try string(top, "commit_policy", "", default: "majority")
        let policy: CommitPolicy
        switch policyText {
        case "majority": policy = .majority
        case "majority-two-domains": policy = .majorityTwoDomains
        case "async": policy = .async(maxLagRecords: UInt64(try number(top, "async_max_lag_records", "", default: 1000, min: 1, max: 1e9)))
        default: throw fail("commit_policy", "\"majority\", \"majority-two-domains\" or \"async\", got \"\(policyText)\"")
        }

        let t = try object(top["timing"] ?? [String: Any](), "timing",
                           allowed: ["lease_ms", "heartbeat_ms", "drift_bound", "election_jitter_ms", "transfer_timeout_ms"])
        var timing = Timing()
        timing.leaseDuration = .milliseconds(try number(t, "lease_ms", "timing.", default: 2000, min: 10, max: 600_000))
        timing.heartbeatInterval = .milliseconds(try number(t, "heartbeat_ms", "timing.", default: 500, min: 1, max: 600_000))
        timing.driftBound = try number(t, "drift_bound", "timing.", default: 0.01, min: 0.000001, max: 0.099)
        timing.electionJitter = .milliseconds(try number(t, "election_jitter_ms", "timing.", default: 300, min: 1, max: 600_000))
        timing.transferTimeout = .milliseconds(try number(t, "transfer_timeout_ms", "timing.", default: 4000, min: 10, max: 600_000))
        do { try timing.validate() } catch { throw fail("timing", "\(error)") }

        let d = try object(top["disk"] ?? [String: Any](), "disk", allowed: ["fsync_ms", "fsync_jitter_ms"])
        let disk = Scenario.DiskSpec(fsyncMS: try number(d, "fsync_ms", "disk.", default: 0.3, max: 60_000),
                                     fsyncJitterMS: try number(d, "fsync_jitter_ms", "disk.", default: 0.2, max: 60_000))

        let w = try object(top["workload"] ?? [String: Any](), "workload",
                           allowed: ["writes_per_second", "bookings", "cancellations", "consultations", "documents", "document_bytes"])
        let workload = Scenario.WorkloadSpec(
            writesPerSecond: try number(w, "writes_per_second", "workload.", default: 20, max: 100_000),
            bookings: try number(w, "bookings", "workload.", default: 5),
            cancellations: try number(w, "cancellations", "workload.", default: 1),
            consultations: try number(w, "consultations", "workload.", default: 3),
            documents: try number(w, "documents", "workload.", default: 1),
            documentBytes: Int(try number(w, "document_bytes", "workload.", default: 2048, max: 16_777_216)))

        var faults: [Scenario.Fault] = []
        if let f = top["faults"] {
            guard let list = f as? [Any] else { throw fail("faults", "a list of faults") }
            for (i, item) in list.enumerated() {
                faults.append(try fault(item, index: i, ids: ids, domains: domains, duration: duration))
            }
        }
        faults.sort { $0.atSeconds < $1.atSeconds }

        let e = try object(top["expect"] ?? [String: Any](), "expect",
                           allowed: ["recover_within_seconds", "max_lost_acknowledged", "allow_lease_overlap", "converge"])
        let expect = Scenario.Expectations(
            recoverWithinSeconds: try number(e, "recover_within_seconds", "expect.", default: 10, min: 0.1, max: 86_400),
            maxLostAcknowledged: Int(try number(e, "max_lost_acknowledged", "expect.", default: 0, max: 1e9)),
            allowLeaseOverlap: try bool(e, "allow_lease_overlap", "expect.", default: false),
            converge: try bool(e, "converge", "expect.", default: true))

        let scenario = Scenario(name: name, description: description, durationSeconds: duration, sites: sites, network: network,
                                commitPolicy: policy, timing: timing, disk: disk, workload: workload, faults: faults, expect: expect)
        do { try scenario.clusterConfig.validate() } catch { throw fail("sites", "\(error)") }
        return scenario
    }

    func fault(_ item: Any, index i: Int, ids: Set<String>, domains: Set<String>, duration: Double) throws(ScenarioError) -> Scenario.Fault {
        let path = "faults[\(i)]."
        let o = try object(item, "faults[\(i)]", allowed: ["at_seconds", "action", "site", "domain", "groups", "one_way", "seconds",
                                                           "ppm", "fsync_ms", "a", "b", "period_seconds", "until_seconds", "to", "loss"])
        let at = try number(o, "at_seconds", path, max: duration)
        let action = try string(o, "action", path)
        func site(_ k: String = "site") throws(ScenarioError) -> String {
            let s = try string(o, k, path)
            guard ids.contains(s) else { throw fail(path + k, "a configured site id (\(ids.sorted().joined(separator: ", "))), got \"\(s)\"") }
            return s
        }
        func domain() throws(ScenarioError) -> String {
            let s = try string(o, "domain", path)
            guard domains.contains(s) else { throw fail(path + "domain", "a configured failure domain (\(domains.sorted().joined(separator: ", "))), got \"\(s)\"") }
            return s
        }
        let a: Scenario.Action
        switch action {
        case "crash": a = .crash(site: try site())
        case "crash_domain": a = .crashDomain(domain: try domain())
        case "restart": a = .restart(site: try site())
        case "lose_disk": a = .loseDisk(site: try site())
        case "restart_domain": a = .restartDomain(domain: try domain())
        case "partition":
            guard let groups = o["groups"] as? [[String]], groups.count == 2, groups.allSatisfy({ $0.allSatisfy(ids.contains) }) else {
                throw fail(path + "groups", "two lists of configured site ids, like [[\"sbg\"], [\"gra\", \"rbx\"]]")
            }
            a = .partition(groups: groups, oneWay: try bool(o, "one_way", path, default: false))
        case "isolate_domain": a = .isolateDomain(domain: try domain())
        case "heal": a = .heal
        case "pause": a = .pause(site: try site(), seconds: try number(o, "seconds", path, min: 0.001, max: 86_400))
        case "clock_drift": a = .clockDrift(site: try site(), ppm: try number(o, "ppm", path, min: -200_000, max: 200_000))
        case "slow_disk": a = .slowDisk(site: try site(), fsyncMS: try number(o, "fsync_ms", path, max: 60_000))
        case "fsync_error": a = .fsyncError(site: try site())
        case "disk_full": a = .diskFull(site: try site())
        case "disk_freed": a = .diskFreed(site: try site())
        case "flap_link":
            a = .flapLink(a: try site("a"), b: try site("b"), periodSeconds: try number(o, "period_seconds", path, min: 0.01, max: 3600),
                          untilSeconds: try number(o, "until_seconds", path, max: duration))
        case "switchover": a = .switchover(to: try site("to"))
        case "crash_primary": a = .crashPrimary
        case "pause_primary": a = .pausePrimary(seconds: try number(o, "seconds", path, min: 0.001, max: 86_400))
        case "isolate_primary": a = .isolatePrimary
        case "stop_workload": a = .stopWorkload
        case "set_loss": a = .setLoss(try number(o, "loss", path, max: 0.9))
        default:
            throw fail(path + "action", "one of crash, crash_domain, restart, restart_domain, partition, isolate_domain, heal, pause, "
                       + "clock_drift, slow_disk, fsync_error, disk_full, disk_freed, flap_link, switchover, crash_primary, "
                       + "pause_primary, isolate_primary, stop_workload, set_loss; got \"\(action)\"")
        }
        return Scenario.Fault(atSeconds: at, action: a)
    }
}
