import Foundation
import TandemCore
import TandemModel

/// One site's configuration file (TOML). Every key, its meaning and its default are in
/// Deploy/README.md; an unknown key is an error. A single key may be overridden by an
/// environment variable named TANDEM_ followed by its path in capitals, dots as
/// underscores (`TANDEM_TIMING_LEASE_MS=3000`).
public struct SiteConfiguration: Sendable {
    public struct Site: Hashable, Sendable {
        public var id: SiteID
        public var domain: FailureDomain
        public var role: SiteRole
        /// host:port of its peer (TLS) listener, and of its HTTP API.
        public var peerAddress: String
        public var httpAddress: String
    }

    public var clusterID: ClusterID
    public var siteID: SiteID
    public var dataDirectory: String
    public var listenPeer: String
    public var listenHTTP: String
    public var sites: [Site]
    public var commitPolicy: CommitPolicy
    public var timing: Timing
    /// A peer connection on which nothing arrived for this long is closed and dialed
    /// again (pings keep an idle one alive): how soon a silently cut-off peer is noticed.
    public var peerTimeoutMilliseconds: Int
    public var tlsCertificate: String
    public var tlsPrivateKey: String
    public var tlsCA: String
    public var allowTLS12: Bool
    public var reloadTLSOnChange: Bool
    public var apiTokenFile: String?
    public var logFormat: String
    public var replicaLagDefault: String
    public var maxBodyBytes: Int
    /// The HTTP API speaks HTTPS with the site's certificate ([tls] certificate and key).
    public var apiTLS: Bool
    public var maxDocumentBytes: Int
    public var waitForPrimaryMilliseconds: Int
    public var readWaitMilliseconds: Int
    /// A command run on each role change (becoming primary, ceasing to be, losing or
    /// regaining the majority), with TANDEM_EVENT, TANDEM_SITE, TANDEM_ROLE, TANDEM_TERM
    /// and TANDEM_REASON in its environment.
    public var hookCommand: String?
    public var hookTimeoutMilliseconds: Int
    /// Size of a log segment file, bytes.
    public var segmentBytes: Int
    /// Log batches written with O_DIRECT past the page cache (where the file system takes it).
    public var directIO: Bool
    /// A local snapshot every this many applied records (0: never); the log it covers is
    /// then removed as far as the retention allows.
    public var snapshotEveryRecords: Int
    /// ... and only once the log written since the last snapshot is at least this
    /// fraction of the database's size, so that copying a large database stays in
    /// proportion to what was written (0: the record count alone decides).
    public var snapshotLogFraction: Double
    /// Covered log kept for lagging peers: at most this many bytes, and this many hours.
    public var retainLogBytes: Int
    public var retainLogHours: Double

    /// The cluster as the core sees it.
    public var cluster: ClusterConfig {
        ClusterConfig(sites: sites.map { SiteDescriptor(id: $0.id, domain: $0.domain, role: $0.role) }, commitPolicy: commitPolicy, timing: timing)
    }

    public var me: Site? { sites.first { $0.id == siteID } }
}

/// A configuration that does not hold: the file, the key, the line when known, and what
/// was expected.
public struct ConfigFileError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let key: String
    public let line: Int?
    public let expected: String
    public var description: String {
        "\(file)\(line.map { ":\($0)" } ?? ""): key \(key): expected \(expected)"
    }
}

extension SiteConfiguration {
    /// Reads and validates a site's configuration file.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigFileError) -> SiteConfiguration {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigFileError(file: path, key: "(file)", line: nil, expected: "a readable UTF-8 file")
        }
        return try parse(text, file: path, environment: environment)
    }

    public static func parse(_ text: String, file: String, environment: [String: String] = [:]) throws(ConfigFileError) -> SiteConfiguration {
        let table: TOMLTable
        do { table = try TOMLParser.parse(text) } catch {
            throw ConfigFileError(file: file, key: "(syntax)", line: error.line, expected: "valid TOML (\(error.message), column \(error.column))")
        }
        var r = ConfigReader(file: file, environment: environment)
        return try r.read(table)
    }
}

struct ConfigReader {
    let file: String
    let environment: [String: String]

    func fail(_ key: String, _ line: Int?, _ expected: String) -> ConfigFileError {
        ConfigFileError(file: file, key: key, line: line, expected: expected)
    }

    func check(_ t: TOMLTable, _ path: String, allowed: Set<String>) throws(ConfigFileError) {
        for k in t.keys where !allowed.contains(k) {
            throw fail(path.isEmpty ? k : "\(path).\(k)", t.line(of: k), "one of the known keys (\(allowed.sorted().joined(separator: ", ")))")
        }
    }

    /// The value at `key` of `t`, or the environment's override of it.
    func raw(_ t: TOMLTable, _ path: String, _ key: String) -> (TOMLValue?, Int?, fromEnvironment: Bool) {
        let full = path.isEmpty ? key : "\(path).\(key)"
        let env = "TANDEM_" + full.uppercased().replacingOccurrences(of: ".", with: "_")
        if let override = environment[env] {
            if let n = Int64(override) { return (.integer(n), nil, true) }
            if let d = Double(override), override.contains(".") { return (.float(d), nil, true) }
            if override == "true" || override == "false" { return (.bool(override == "true"), nil, true) }
            return (.string(override), nil, true)
        }
        return (t[key], t.line(of: key), false)
    }

    func string(_ t: TOMLTable, _ path: String, _ key: String, default d: String? = nil) throws(ConfigFileError) -> String {
        let (v, line, _) = raw(t, path, key)
        let full = path.isEmpty ? key : "\(path).\(key)"
        guard let v else {
            if let d { return d }
            throw fail(full, nil, "a string (required)")
        }
        guard case let .string(s) = v, !s.isEmpty else { throw fail(full, line, "a non-empty string, found \(v.typeName)") }
        return s
    }

    /// A site id: it names the site in its certificate (a DNS name) and orders the pair's
    /// connections (docs/WIRE.md), so a DNS label: lowercase letters, digits and hyphens.
    func siteName(_ t: TOMLTable, _ path: String, _ key: String) throws(ConfigFileError) -> String {
        let name = try string(t, path, key)
        let ok = name.utf8.count <= 63 && name.first != "-" && name.last != "-"
            && name.unicodeScalars.allSatisfy { ("a"..."z").contains($0) || ("0"..."9").contains($0) || $0 == "-" }
        guard ok else {
            let (_, line, _) = raw(t, path, key)
            throw fail(path.isEmpty ? key : "\(path).\(key)", line,
                       "a site id made of lowercase letters, digits and inner hyphens (a DNS label, at most 63 characters), found \"\(name)\"")
        }
        return name
    }

    /// A string that may be absent (in the file and in the environment).
    func optionalString(_ t: TOMLTable, _ path: String, _ key: String) throws(ConfigFileError) -> String? {
        guard raw(t, path, key).0 != nil else { return nil }
        return try string(t, path, key)
    }

    func integer(_ t: TOMLTable, _ path: String, _ key: String, default d: Int64, min: Int64, max: Int64) throws(ConfigFileError) -> Int64 {
        let (v, line, _) = raw(t, path, key)
        let full = path.isEmpty ? key : "\(path).\(key)"
        guard let v else { return d }
        guard case let .integer(n) = v else { throw fail(full, line, "an integer, found \(v.typeName)") }
        guard n >= min, n <= max else { throw fail(full, line, "an integer between \(min) and \(max), found \(n)") }
        return n
    }

    func double(_ t: TOMLTable, _ path: String, _ key: String, default d: Double, min: Double, max: Double) throws(ConfigFileError) -> Double {
        let (v, line, _) = raw(t, path, key)
        let full = path.isEmpty ? key : "\(path).\(key)"
        guard let v else { return d }
        let x: Double
        switch v {
        case let .float(f): x = f
        case let .integer(n): x = Double(n)
        default: throw fail(full, line, "a number, found \(v.typeName)")
        }
        guard x >= min, x <= max else { throw fail(full, line, "a number between \(min) and \(max), found \(x)") }
        return x
    }

    func bool(_ t: TOMLTable, _ path: String, _ key: String, default d: Bool) throws(ConfigFileError) -> Bool {
        let (v, line, _) = raw(t, path, key)
        guard let v else { return d }
        guard case let .bool(b) = v else { throw fail(path.isEmpty ? key : "\(path).\(key)", line, "true or false, found \(v.typeName)") }
        return b
    }

    func table(_ t: TOMLTable, _ key: String) throws(ConfigFileError) -> TOMLTable {
        guard let v = t[key] else { return TOMLTable() }
        guard case let .table(sub) = v else { throw fail(key, t.line(of: key), "a table ([\(key)]), found \(v.typeName)") }
        return sub
    }

    func address(_ s: String, _ key: String, _ line: Int?) throws(ConfigFileError) -> String {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, let port = Int(parts[1]), port > 0, port < 65536 else {
            throw fail(key, line, "host:port, like 10.0.0.1:7401, found \"\(s)\"")
        }
        return s
    }

    mutating func read(_ top: TOMLTable) throws(ConfigFileError) -> SiteConfiguration {
        try check(top, "", allowed: ["cluster_id", "site_id", "data_directory", "commit_policy", "async_max_lag_records", "listen",
                                     "timing", "tls", "api", "logging", "hooks", "storage", "sites"])
        let cidText = try string(top, "", "cluster_id")
        guard let cid = ClusterID(cidText) else { throw fail("cluster_id", top.line(of: "cluster_id"), "a UUID, found \"\(cidText)\"") }
        let siteID = SiteID(try siteName(top, "", "site_id"))
        let dataDirectory = try string(top, "", "data_directory")

        let listen = try table(top, "listen")
        try check(listen, "listen", allowed: ["peer", "http"])
        let listenPeer = try address(try string(listen, "listen", "peer"), "listen.peer", listen.line(of: "peer"))
        let listenHTTP = try address(try string(listen, "listen", "http"), "listen.http", listen.line(of: "http"))

        let policyText = try string(top, "", "commit_policy", default: "majority")
        let policy: CommitPolicy
        switch policyText {
        case "majority": policy = .majority
        case "majority-two-domains": policy = .majorityTwoDomains
        case "async":
            policy = .async(maxLagRecords: UInt64(try integer(top, "", "async_max_lag_records", default: 1000, min: 1, max: 1_000_000_000)))
        default:
            throw fail("commit_policy", top.line(of: "commit_policy"), "\"majority\", \"majority-two-domains\" or \"async\", found \"\(policyText)\"")
        }

        let t = try table(top, "timing")
        try check(t, "timing", allowed: ["lease_ms", "heartbeat_ms", "drift_bound", "election_jitter_ms", "transfer_timeout_ms", "peer_timeout_ms"])
        let peerTimeout = Int(try integer(t, "timing", "peer_timeout_ms", default: 3000, min: 300, max: 600_000))
        var timing = Timing()
        timing.leaseDuration = .milliseconds(Double(try integer(t, "timing", "lease_ms", default: Int64(TimingDefaults.leaseMilliseconds), min: 10, max: 600_000)))
        timing.heartbeatInterval = .milliseconds(Double(try integer(t, "timing", "heartbeat_ms", default: Int64(TimingDefaults.heartbeatMilliseconds), min: 1, max: 600_000)))
        timing.driftBound = try double(t, "timing", "drift_bound", default: 0.01, min: 0.000001, max: 0.099)
        timing.electionJitter = .milliseconds(Double(try integer(t, "timing", "election_jitter_ms", default: Int64(TimingDefaults.electionJitterMilliseconds), min: 1, max: 600_000)))
        timing.transferTimeout = .milliseconds(Double(try integer(t, "timing", "transfer_timeout_ms", default: 4000, min: 10, max: 600_000)))
        do { try timing.validate() } catch {
            guard case let .invalid(key, expected) = error else { throw fail("timing", nil, "\(error)") }
            let k = ["lease_duration": "lease_ms", "heartbeat_interval": "heartbeat_ms", "election_jitter": "election_jitter_ms",
                     "transfer_timeout": "transfer_timeout_ms"][key] ?? key
            throw fail("timing.\(k)", t.line(of: k), expected)
        }

        let tls = try table(top, "tls")
        try check(tls, "tls", allowed: ["certificate", "private_key", "ca", "allow_tls12", "reload_on_change"])
        let api = try table(top, "api")
        try check(api, "api", allowed: ["token_file", "replica_lag_default", "max_body_bytes", "max_document_bytes",
                                        "wait_for_primary_ms", "read_wait_ms", "tls"])
        let storage = try table(top, "storage")
        try check(storage, "storage", allowed: ["segment_bytes", "direct_io", "snapshot_every_records", "snapshot_log_fraction", "retain_log_bytes", "retain_log_hours"])
        let hooks = try table(top, "hooks")
        try check(hooks, "hooks", allowed: ["command", "timeout_ms"])
        let maxBody = Int(try integer(api, "api", "max_body_bytes", default: 20 << 20, min: 1024, max: 30 << 20))
        let maxDocument = Int(try integer(api, "api", "max_document_bytes", default: 16 << 20, min: 1, max: 16 << 20))
        guard maxDocument <= maxBody else {
            throw fail("api.max_document_bytes", api.line(of: "max_document_bytes"), "at most api.max_body_bytes (\(maxBody))")
        }
        let lagDefault = try string(api, "api", "replica_lag_default", default: "10000")
        let logging = try table(top, "logging")
        try check(logging, "logging", allowed: ["format"])
        let format = try string(logging, "logging", "format", default: "keyvalue")
        guard format == "keyvalue" || format == "json" else {
            throw fail("logging.format", logging.line(of: "format"), "\"keyvalue\" or \"json\", found \"\(format)\"")
        }

        guard case let .array(items)? = top["sites"], !items.isEmpty else {
            throw fail("sites", top.line(of: "sites"), "one [[sites]] table per site of the cluster")
        }
        var sites: [SiteConfiguration.Site] = []
        for (i, item) in items.enumerated() {
            let path = "sites[\(i)]"
            guard case let .table(s) = item else { throw fail(path, top.line(of: "sites"), "a [[sites]] table") }
            try check(s, path, allowed: ["id", "domain", "role", "peer_address", "http_address"])
            let roleText = try string(s, path, "role", default: "voter")
            guard let role = SiteRole(rawValue: roleText) else { throw fail("\(path).role", s.line(of: "role"), "\"voter\" or \"witness\", found \"\(roleText)\"") }
            sites.append(SiteConfiguration.Site(
                id: SiteID(try siteName(s, path, "id")), domain: FailureDomain(try string(s, path, "domain")), role: role,
                peerAddress: try address(try string(s, path, "peer_address"), "\(path).peer_address", s.line(of: "peer_address")),
                httpAddress: try address(try string(s, path, "http_address"), "\(path).http_address", s.line(of: "http_address"))))
        }
        guard Set(sites.map(\.id)).count == sites.count else { throw fail("sites", top.line(of: "sites"), "unique site ids") }
        guard sites.contains(where: { $0.id == siteID }) else {
            throw fail("site_id", top.line(of: "site_id"), "one of the [[sites]] ids (\(sites.map(\.id.name).joined(separator: ", "))), found \"\(siteID)\"")
        }
        let config = SiteConfiguration(
            clusterID: cid, siteID: siteID, dataDirectory: dataDirectory, listenPeer: listenPeer, listenHTTP: listenHTTP, sites: sites,
            commitPolicy: policy, timing: timing, peerTimeoutMilliseconds: peerTimeout,
            tlsCertificate: try string(tls, "tls", "certificate"), tlsPrivateKey: try string(tls, "tls", "private_key"),
            tlsCA: try string(tls, "tls", "ca"), allowTLS12: try bool(tls, "tls", "allow_tls12", default: false),
            reloadTLSOnChange: try bool(tls, "tls", "reload_on_change", default: false),
            apiTokenFile: try optionalString(api, "api", "token_file"),
            logFormat: format, replicaLagDefault: lagDefault,
            maxBodyBytes: maxBody, apiTLS: try bool(api, "api", "tls", default: false), maxDocumentBytes: maxDocument,
            waitForPrimaryMilliseconds: Int(try integer(api, "api", "wait_for_primary_ms", default: 6000, min: 0, max: 600_000)),
            readWaitMilliseconds: Int(try integer(api, "api", "read_wait_ms", default: 5000, min: 0, max: 600_000)),
            hookCommand: try optionalString(hooks, "hooks", "command"),
            hookTimeoutMilliseconds: Int(try integer(hooks, "hooks", "timeout_ms", default: 5000, min: 10, max: 600_000)),
            segmentBytes: Int(try integer(storage, "storage", "segment_bytes", default: 64 << 20, min: 64 << 10, max: 1 << 30)),
            directIO: try bool(storage, "storage", "direct_io", default: true),
            snapshotEveryRecords: Int(try integer(storage, "storage", "snapshot_every_records", default: 100_000, min: 0, max: 1_000_000_000)),
            snapshotLogFraction: try double(storage, "storage", "snapshot_log_fraction", default: 0.5, min: 0, max: 100),
            retainLogBytes: Int(try integer(storage, "storage", "retain_log_bytes", default: 1 << 30, min: 0, max: 1 << 40)),
            retainLogHours: try double(storage, "storage", "retain_log_hours", default: 24, min: 0, max: 24 * 365))
        do { try config.cluster.validate() } catch {
            throw fail("sites", top.line(of: "sites"), "\(error)")
        }
        return config
    }
}

/// The timing a site uses when its file does not choose: a dead primary is replaced about
/// 1.5 s (one lease, plus up to the jitter) after it stopped answering, as fast as etcd with
/// its defaults (heartbeat 100 ms, election timeout 1 s, measured 2.0 s to a new leader on
/// this kind of machine), while five heartbeats per lease ride out a lost one or two. A
/// WAN link with longer hiccups wants a longer lease (Deploy/examples choose 2-3 s).
public enum TimingDefaults {
    public static let leaseMilliseconds = 1_500
    public static let heartbeatMilliseconds = 300
    public static let electionJitterMilliseconds = 200
}
