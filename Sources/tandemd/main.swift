import ArgumentParser
import Dispatch
import Foundation
import TandemConfig
import TandemCore
import TandemHTTP
import TandemModel
import TandemNode
import TandemStore
import TandemTransport

/// The site daemon: runs one site of a Tandem cluster from its configuration file.
@main
struct Tandemd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandemd",
        abstract: "Tandem site daemon.",
        discussion: """
        tandemd --config FILE runs the site (replication over mutual TLS, elections, its HTTP probes and API).
        tandemd --check-config FILE validates a configuration without starting, and warns about placement.
        A new cluster is bootstrapped explicitly: --init creates a missing data directory; without it a
        missing data directory is an error, never silently a new cluster.
        """)

    @Option(help: "The site's configuration file (TOML).") var config: String?
    @Option(help: "Validate this configuration file and exit.") var checkConfig: String?
    @Flag(help: "Create the data directory of a new site if it does not exist yet.") var `init` = false

    func run() async throws {
        if let path = checkConfig {
            do {
                let c = try SiteConfiguration.load(path: path)
                print("\(path): valid (site \(c.siteID), \(c.sites.count) sites, commit policy \(c.commitPolicy))")
                for w in c.cluster.placementWarnings { print("warning: \(w)") }
                return
            } catch {
                FileHandle.standardError.write(Data("tandemd: \(error)\n".utf8))
                throw ExitCode(2)
            }
        }
        guard let path = config else { throw ValidationError("give --config FILE (or --check-config FILE)") }
        let c: SiteConfiguration
        do { c = try SiteConfiguration.load(path: path) } catch {
            FileHandle.standardError.write(Data("tandemd: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let log = Logger(format: c.logFormat, site: c.siteID)
        for w in c.cluster.placementWarnings { log.emit("event=placement_warning detail=\"\(w)\"") }
        if !SiteStorage.exists(dataDirectory: c.dataDirectory) {
            guard self.`init` else {
                FileHandle.standardError.write(Data("tandemd: no site data in \(c.dataDirectory); to start a new site there, run with --init\n".utf8))
                throw ExitCode(2)
            }
            try SiteRuntime.bootstrap(dataDirectory: c.dataDirectory, clusterID: c.clusterID)
            log.emit("event=site_created data_directory=\(c.dataDirectory)")
        }
        let runtime = try makeRuntime(c, log: log)
        try runtime.start()
        let lag: LagThreshold
        switch LagThreshold.parse(c.replicaLagDefault) {
        case let .success(l): lag = l
        case .failure: lag = LagThreshold(records: 10_000)
        }
        let router = makeRouter(runtime: runtime, site: c.siteID, defaultLag: lag, sites: c.cluster.sites)
        let parts = c.listenHTTP.split(separator: ":")
        let http = Task {
            do { try await runHTTP(router: router, host: String(parts[0]), port: Int(parts[1]) ?? 0) } catch {
                log.emit("event=http_failed reason=\"\(error)\"")
            }
        }
        log.emit("event=started peer=\(c.listenPeer) http=\(c.listenHTTP)")
        await waitForTermination(runtime, config: c, log: log)
        http.cancel()
        runtime.stop()
        log.emit("event=stopped")
    }

    func makeRuntime(_ c: SiteConfiguration, log: Logger) throws -> SiteRuntime {
        func endpoint(_ s: String) -> PeerEndpoint {
            let parts = s.split(separator: ":")
            return PeerEndpoint(host: String(parts[0]), port: UInt16(parts[1]) ?? 0)
        }
        var peers: [SiteID: PeerEndpoint] = [:]
        for s in c.sites where s.id != c.siteID { peers[s.id] = endpoint(s.peerAddress) }
        let transport = TransportSettings(site: c.siteID, clusterID: c.clusterID, listen: endpoint(c.listenPeer), peers: peers)
        var settings = NodeSettings(config: c.cluster, site: c.siteID, clusterID: c.clusterID, dataDirectory: c.dataDirectory, transport: transport)
        settings.log = { log.emit($0) }
        let files = TLSFiles(certificate: c.tlsCertificate, privateKey: c.tlsPrivateKey, certificateAuthority: c.tlsCA, allowTLS12: c.allowTLS12)
        return try SiteRuntime(settings: settings, tls: try TLSContext(files: files))
    }

    /// SIGTERM: a primary first hands its leadership to another voter (switchover), then
    /// the site stops; SIGINT stops at once; SIGHUP re-reads the TLS files.
    func waitForTermination(_ runtime: SiteRuntime, config: SiteConfiguration, log: Logger) async {
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        signal(SIGHUP, SIG_IGN)
        let stream = AsyncStream<Int32> { continuation in
            let queue = DispatchQueue(label: "tandemd-signals")
            var sources: [any DispatchSourceSignal] = []
            for sig in [SIGTERM, SIGINT, SIGHUP] {
                let s = DispatchSource.makeSignalSource(signal: sig, queue: queue)
                s.setEventHandler { continuation.yield(sig) }
                s.resume()
                sources.append(s)
            }
            let keep = SignalSources(sources)
            continuation.onTermination = { _ in keep.cancel() }
        }
        for await sig in stream {
            switch sig {
            case SIGHUP:
                do {
                    try runtime.transport.reloadTLS()
                } catch {
                    log.emit("event=tls_reload_failed reason=\"\(error)\"")
                }
            case SIGTERM:
                let status = runtime.status
                let connected = Set(runtime.transport.connectedPeers)
                if status.role == .primary,
                   let target = config.sites.first(where: { $0.id != config.siteID && $0.role == .voter && connected.contains($0.id) }) {
                    log.emit("event=switchover_on_shutdown to=\(target.id)")
                    runtime.transferLeadership(to: target.id)
                    let deadline = Date().addingTimeInterval(Double(config.timing.transferTimeout) / 1e9)
                    while Date() < deadline && runtime.status.role == .primary { try? await Task.sleep(for: .milliseconds(20)) }
                }
                return
            default:
                return
            }
        }
    }
}

/// One line per event: key=value, or JSON when configured.
struct Logger: Sendable {
    let format: String
    let site: SiteID

    func emit(_ line: String) {
        let now = ISO8601DateFormatter().string(from: Date())
        let text: String
        if format == "json" {
            let object: [String: String] = ["time": now, "site": site.name, "line": line]
            text = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? line
        } else {
            text = "time=\(now) site=\(site) \(line)"
        }
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }
}

/// Keeps the signal sources alive while the daemon waits.
final class SignalSources: @unchecked Sendable {
    // Only cancelled, once, when the stream ends.
    private let sources: [any DispatchSourceSignal]
    init(_ sources: [any DispatchSourceSignal]) { self.sources = sources }
    func cancel() { for s in sources { s.cancel() } }
}
