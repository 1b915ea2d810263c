import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Glibc
import TandemHTTP

/// Real `tandemd` processes on loopback, for fire drills and cluster benchmarks: a
/// development CA and certificates (Deploy/make-certs.sh), one configuration file and
/// data directory per site, an admin API token. With `proxied`, every site reaches every
/// other through a `TCPProxy`, so a drill can cut a site off.
public final class LocalCluster: @unchecked Sendable {
    public struct Options: Sendable {
        public var sites = ["sbg", "gra", "rbx"]
        public var domains: [String]? = nil
        public var leaseMilliseconds = 1_000
        public var heartbeatMilliseconds = 200
        public var jitterMilliseconds = 200
        public var transferTimeoutMilliseconds = 2_000
        public var waitForPrimaryMilliseconds = 6_000
        public var commitPolicy = "majority"
        public var proxied = false
        /// Extra TOML for every site's [storage] table (e.g. small segments and frequent
        /// snapshots, so a rebuilt site must take the snapshot path).
        public var storage = ""
        /// Each site in a network namespace of its own (root only): partitions are links
        /// brought down rather than proxies cutting connections.
        public var namespaced = false
        public init() {}
    }

    public let options: Options
    public let dir: String
    public let binDirectory: String
    public let clusterID = UUID().uuidString.lowercased()
    public let token = TokenStore.generate()
    public private(set) var peerPorts: [String: UInt16] = [:]
    public private(set) var httpPorts: [String: UInt16] = [:]
    private var proxies: [String: TCPProxy] = [:]  // "from>to"
    public private(set) var namespaces: NetworkNamespaces?
    private let lock = NSLock()
    private var processes: [String: Process] = [:]  // guarded by `lock`
    private var started: Set<String> = []  // guarded by `lock`
    private var handedOut: Set<UInt16> = []  // ports given to this cluster (set up on one thread)

    /// `binDirectory` holds tandemd; `deployDirectory` holds make-certs.sh.
    public init(options: Options = Options(), binDirectory: String, deployDirectory: String, dir: String? = nil) throws {
        // The drill writes to sockets and pipes whose other end it kills on purpose: those
        // writes must fail with EPIPE, never end the drill itself with SIGPIPE.
        _ = Glibc.signal(SIGPIPE, SIG_IGN)
        self.options = options
        self.binDirectory = binDirectory
        self.dir = dir ?? NSTemporaryDirectory() + "tandem-drill-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: self.dir, withIntermediateDirectories: true)
        do { try prepare(deployDirectory: deployDirectory) } catch {
            // Nothing half-made is left behind: proxies stopped, files (the CA key) removed.
            for p in proxies.values { p.stop() }
            namespaces?.remove()
            try? FileManager.default.removeItem(atPath: self.dir)
            throw error
        }
    }

    private func prepare(deployDirectory: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [deployDirectory + "/make-certs.sh", self.dir + "/pki"] + options.sites
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw DrillError("make-certs.sh failed (\(p.terminationStatus))") }
        try (TokenStore.line(name: "drill", scope: .admin, token: token) + "\n").write(toFile: self.dir + "/tokens", atomically: true, encoding: .utf8)
        if options.namespaced {
            // A network stack per site: the usual ports on the site's own address.
            namespaces = try NetworkNamespaces(sites: options.sites)
            for s in options.sites {
                peerPorts[s] = 7401
                httpPorts[s] = 8401
            }
        } else {
            for s in options.sites {
                peerPorts[s] = try freePort()
                httpPorts[s] = try freePort()
            }
        }
        for from in options.sites {
            for to in options.sites where to != from && options.proxied {
                proxies["\(from)>\(to)"] = try TCPProxy(listenPort: try freePort(), targetPort: peerPorts[to]!)
            }
            try config(for: from).write(toFile: configPath(from), atomically: true, encoding: .utf8)
        }
    }

    public func configPath(_ site: String) -> String { dir + "/\(site).toml" }
    public func dataDirectory(_ site: String) -> String { dir + "/data-\(site)" }
    public func logPath(_ site: String) -> String { dir + "/\(site).log" }
    public func url(_ site: String) -> String { "http://\(host(site)):\(httpPorts[site]!)" }

    /// Where a site listens: loopback, or its address in its namespace.
    public func host(_ site: String) -> String { namespaces?.address(site) ?? "127.0.0.1" }

    func config(for site: String) -> String {
        let domains = options.domains ?? options.sites
        var text = """
            cluster_id = "\(clusterID)"
            site_id = "\(site)"
            data_directory = "\(dataDirectory(site))"
            commit_policy = "\(options.commitPolicy)"

            [listen]
            peer = "\(host(site)):\(peerPorts[site]!)"
            http = "\(host(site)):\(httpPorts[site]!)"

            [timing]
            lease_ms = \(options.leaseMilliseconds)
            heartbeat_ms = \(options.heartbeatMilliseconds)
            election_jitter_ms = \(options.jitterMilliseconds)
            transfer_timeout_ms = \(options.transferTimeoutMilliseconds)

            [tls]
            certificate = "\(dir)/pki/\(site).pem"
            private_key = "\(dir)/pki/\(site).key"
            ca = "\(dir)/pki/ca.pem"

            [api]
            token_file = "\(dir)/tokens"
            wait_for_primary_ms = \(options.waitForPrimaryMilliseconds)

            [storage]
            \(options.storage)

            """
        for (i, other) in options.sites.enumerated() {
            let peer = other == site || !options.proxied ? peerPorts[other]! : proxies["\(site)>\(other)"]!.listenPort
            text += """

                [[sites]]
                id = "\(other)"
                domain = "\(domains[i])"
                peer_address = "\(options.proxied && other != site ? "127.0.0.1" : host(other)):\(peer)"
                http_address = "\(host(other)):\(httpPorts[other]!)"

                """
        }
        return text
    }

    /// Starts a site's daemon: a missing data directory is created as a new cluster's
    /// site the first time, and as a site rejoining without its disk after a `wipe`.
    public func start(_ site: String) throws {
        let p = Process()
        let first = lock.withLock { started.insert(site).inserted }
        let create = FileManager.default.fileExists(atPath: dataDirectory(site)) ? [] : first ? ["--init"] : ["--rejoin"]
        // `ip netns exec` enters the namespace and then execs tandemd: the same pid.
        let argv = [binDirectory + "/tandemd", "--config", configPath(site)] + create
        let command = namespaces?.wrap(site, argv) ?? argv
        p.executableURL = URL(fileURLWithPath: command[0])
        p.arguments = Array(command.dropFirst())
        if !FileManager.default.fileExists(atPath: logPath(site)) { _ = FileManager.default.createFile(atPath: logPath(site), contents: nil) }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath(site)))
        log.seekToEndOfFile()
        p.standardOutput = log
        p.standardError = log
        p.standardInput = FileHandle.nullDevice
        try p.run()
        lock.withLock { processes[site] = p }
    }

    public func startAll() throws { for s in options.sites { try start(s) } }

    public func pid(_ site: String) -> Int32? { lock.withLock { processes[site].map(\.processIdentifier) } }

    /// Sends `signal` to a site's daemon; SIGKILL also waits for it to be gone.
    public func signal(_ site: String, _ sig: Int32) {
        guard let p = lock.withLock({ processes[site] }) else { return }
        kill(p.processIdentifier, sig)
        if sig == SIGKILL || sig == SIGTERM {
            p.waitUntilExit()
            lock.withLock { processes[site] = nil }
        }
    }

    public func isRunning(_ site: String) -> Bool { lock.withLock { processes[site]?.isRunning ?? false } }

    /// Removes a (stopped) site's data directory: a lost disk.
    public func wipe(_ site: String) throws {
        if FileManager.default.fileExists(atPath: dataDirectory(site)) { try FileManager.default.removeItem(atPath: dataDirectory(site)) }
    }

    /// Cuts a site off from every other (both directions), or heals every link.
    public func cut(_ site: String) {
        namespaces?.setLink(site, up: false)
        for (key, p) in proxies where key.hasPrefix(site + ">") || key.hasSuffix(">" + site) { p.cut() }
    }

    public func heal() {
        if let n = namespaces { for s in options.sites { n.setLink(s, up: true) } }
        for p in proxies.values { p.heal() }
    }

    /// Slows every link of a site (both directions) by `milliseconds` per chunk.
    public func slow(_ site: String, milliseconds: Int) {
        for (key, p) in proxies where key.hasPrefix(site + ">") || key.hasSuffix(">" + site) { p.delay(milliseconds: milliseconds) }
    }

    public func stopAll() {
        for s in options.sites {
            if let p = lock.withLock({ processes[s] }) {
                kill(p.processIdentifier, SIGCONT)
                kill(p.processIdentifier, SIGKILL)
                p.waitUntilExit()
            }
        }
        lock.withLock { processes = [:] }
        for p in proxies.values { p.stop() }
        namespaces?.remove()
    }

    /// Removes the cluster's directory, unless TANDEM_KEEP_DRILL_FILES is set (then its
    /// logs stay for a post-mortem, and their path is printed).
    public func removeFiles() {
        if ProcessInfo.processInfo.environment["TANDEM_KEEP_DRILL_FILES"] != nil {
            print("drill files kept in \(dir)")
            return
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    // MARK: Asking the sites

    /// The site answering 200 on /primary, if exactly one does.
    public func primary() async -> String? {
        var found: [String] = []
        for s in options.sites where isRunning(s) {
            if (try? await HTTP.status("HEAD", url(s) + "/primary")) == 200 { found.append(s) }
        }
        return found.count == 1 ? found[0] : nil
    }

    /// Waits for a primary (and its schema) for up to `seconds`.
    public func waitForPrimary(seconds: Double = 20, excluding: String? = nil) async -> String? {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if let p = await primary(), p != excluding {
                let status = try? await HTTP.json("GET", url(p) + "/status")
                if let site = status?["site"] as? [String: Any], (site["commit_lsn"] as? Int ?? 0) >= 1 { return p }
            }
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        return nil
    }

    public func status(_ site: String) async -> [String: Any]? {
        (try? await HTTP.json("GET", url(site) + "/status"))?["site"] as? [String: Any]
    }

    /// A free loopback port below the kernel's ephemeral range (32768 and up), so that
    /// neither other tests' kernel-chosen ports nor outgoing connections can take it
    /// between now and the moment tandemd binds it.
    public func freePort() throws -> UInt16 {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let port = UInt16.random(in: 20_000..<32_000, using: &rng)
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let ok = withLoopback(port: port) { bind(fd, $0, $1) } == 0
            Glibc.close(fd)
            if ok && !handedOut.contains(port) {
                handedOut.insert(port)
                return port
            }
        }
        throw DrillError("no free port between 20000 and 32000")
    }

    /// Failed starts say why: the end of the site's log.
    public func exitedSites() -> [String: String] {
        var out: [String: String] = [:]
        for s in options.sites {
            guard let p = lock.withLock({ processes[s] }), !p.isRunning else { continue }
            let log = (try? String(contentsOfFile: logPath(s), encoding: .utf8)) ?? ""
            out[s] = "exited with \(p.terminationStatus): " + log.split(separator: "\n").suffix(3).joined(separator: " | ")
        }
        return out
    }
}

/// Small HTTP helpers (URLSession) for drills.
public enum HTTP {
    public struct Answer: Sendable {
        public var status: Int
        public var body: Data
        public var headers: [String: String]
        public var json: [String: Any] { ((try? JSONSerialization.jsonObject(with: body)) as? [String: Any]) ?? [:] }
        public var errorCode: String? { (json["error"] as? [String: Any])?["code"] as? String }
    }

    static let session: URLSession = {
        let c = URLSessionConfiguration.ephemeral
        c.httpMaximumConnectionsPerHost = 128
        c.timeoutIntervalForRequest = 30
        return URLSession(configuration: c)
    }()

    public static func call(_ method: String, _ url: String, token: String? = nil, json: Any? = nil, timeout: Double = 30) async throws -> Answer {
        guard let u = URL(string: url) else { throw DrillError("bad URL \(url)") }
        var r = URLRequest(url: u)
        r.httpMethod = method
        r.timeoutInterval = timeout
        if let token { r.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
        if let json {
            r.httpBody = try JSONSerialization.data(withJSONObject: json)
            r.setValue("application/json", forHTTPHeaderField: "Content-Type")
        }
        let (data, response) = try await session.data(for: r)
        let h = response as? HTTPURLResponse
        var headers: [String: String] = [:]
        for (k, v) in h?.allHeaderFields ?? [:] { headers["\(k)".lowercased()] = "\(v)" }
        return Answer(status: h?.statusCode ?? 0, body: data, headers: headers)
    }

    /// POSTs raw bytes (a document) with the given headers.
    public static func upload(_ url: String, token: String, body: [UInt8], headers: [String: String]) async throws -> Answer {
        guard let u = URL(string: url) else { throw DrillError("bad URL \(url)") }
        var r = URLRequest(url: u)
        r.httpMethod = "POST"
        r.timeoutInterval = 120
        r.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        for (k, v) in headers { r.setValue(v, forHTTPHeaderField: k) }
        r.httpBody = Data(body)
        let (data, response) = try await session.data(for: r)
        let h = response as? HTTPURLResponse
        return Answer(status: h?.statusCode ?? 0, body: data, headers: [:])
    }

    public static func status(_ method: String, _ url: String) async throws -> Int {
        try await call(method, url, timeout: 2).status
    }

    public static func json(_ method: String, _ url: String, token: String? = nil) async throws -> [String: Any] {
        try await call(method, url, token: token, timeout: 5).json
    }
}
