import ArgumentParser
import Dispatch
import Foundation
import Hummingbird
import Logging
import ServiceLifecycle
import TandemConfig
import TandemCore
import TandemHTTP
import TandemModel
import TandemNode
import TandemStore
import TandemTransport
import TandemWAL

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
    @Flag(help: "Create the data directory of a new site if it does not exist yet (a new cluster's first start).") var `init` = false
    @Flag(help: "Create a missing data directory for a site that belonged to the cluster and lost its disk: it abstains from elections until it hears the primary, then catches up from its peers.")
    var rejoin = false

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
        LoggingSystem.bootstrap { _ in LineLogHandler(json: c.logFormat == "json") }
        var logger = Logger(label: "tandemd")
        logger[metadataKey: "site"] = "\(c.siteID)"
        let log = EventLog(logger: logger)
        for w in c.cluster.placementWarnings { log.emit("event=placement_warning detail=\"\(w)\"") }
        let lag: LagThreshold
        switch LagThreshold.parse(c.replicaLagDefault) {
        case let .success(l): lag = l
        case let .failure(e):
            FileHandle.standardError.write(Data("tandemd: \(path): key api.replica_lag_default: \(e.message)\n".utf8))
            throw ExitCode(2)
        }
        let tokens: TokenStore
        do { tokens = try TokenStore(path: c.apiTokenFile) } catch {
            FileHandle.standardError.write(Data("tandemd: api.token_file: \(error)\n".utf8))
            throw ExitCode(2)
        }
        if !SiteStorage.exists(dataDirectory: c.dataDirectory) {
            guard self.`init` || rejoin else {
                let hint = "for a new cluster's site run with --init; for a site that lost its disk, --rejoin (or tandemctl rebuild)"
                FileHandle.standardError.write(Data("tandemd: no site data in \(c.dataDirectory); \(hint)\n".utf8))
                throw ExitCode(2)
            }
            var wal = WALOptions()
            wal.segmentSize = c.segmentBytes
            wal.directIO = c.directIO
            try SiteRuntime.bootstrap(dataDirectory: c.dataDirectory, clusterID: c.clusterID, walOptions: wal, rejoining: rejoin)
            log.emit("event=site_created data_directory=\(c.dataDirectory) rejoining=\(rejoin)")
        }
        let metrics = SiteMetrics()
        let hooks = c.hookCommand.map { RoleHooks(command: $0, timeoutMilliseconds: c.hookTimeoutMilliseconds, site: c.siteID, log: log.emit) }
        let runtime: SiteRuntime
        do { runtime = try makeRuntime(c, log: log, metrics: metrics, hooks: hooks) } catch {
            // Bad TLS files, storage that refuses to open (corruption), a locked directory:
            // an operator must act; exit 2 so systemd does not restart in a loop.
            FileHandle.standardError.write(Data("tandemd: \(error)\n".utf8))
            log.emit("event=start_failed reason=\"\(error)\"")
            throw ExitCode(2)
        }
        var apiSettings = DataAPISettings(site: c.siteID)
        apiSettings.maxBodyBytes = c.maxBodyBytes
        apiSettings.maxDocumentBytes = c.maxDocumentBytes
        apiSettings.waitForPrimaryMilliseconds = UInt32(c.waitForPrimaryMilliseconds)
        apiSettings.readWaitMilliseconds = UInt32(c.readWaitMilliseconds)
        let api = DataAPI(runtime: runtime, settings: apiSettings, tokens: tokens, metrics: metrics)
        let router = makeRouter(runtime: runtime, site: c.siteID, defaultLag: lag, sites: c.cluster.sites, metrics: metrics)
        let parts = c.listenHTTP.split(separator: ":")
        var httpLogger = Logger(label: "tandemd.http")
        httpLogger.logLevel = .warning
        // With api.tls the HTTP server listens on loopback only, behind the HTTPS terminator
        // (the system's OpenSSL, the site's certificate) on the configured address.
        var https: HTTPSTerminator?
        var httpHost = String(parts[0]), httpPort = Int(parts[1]) ?? 0
        if c.apiTLS {
            let backend = try Transport.ephemeralLoopbackPort()
            let files = TLSFiles(certificate: c.tlsCertificate, privateKey: c.tlsPrivateKey, certificateAuthority: c.tlsCA, allowTLS12: true)
            let t = HTTPSTerminator(listen: PeerEndpoint(host: httpHost, port: UInt16(httpPort)), backendPort: backend,
                                    context: try .httpsServer(files: files), log: log.emit)
            try t.start()
            https = t
            httpHost = "127.0.0.1"
            httpPort = Int(backend)
        }
        let watcher = c.reloadTLSOnChange
            ? TLSFileWatcher(transport: runtime.transport,
                             files: TLSFiles(certificate: c.tlsCertificate, privateKey: c.tlsPrivateKey, certificateAuthority: c.tlsCA,
                                             allowTLS12: c.allowTLS12),
                             log: log.emit)
            : nil
        let app = Application(router: router, server: siteHTTPServer(api: api),
                              configuration: .init(address: .hostname(httpHost, port: httpPort), serverName: "tandemd"),
                              logger: httpLogger)
        let site = SiteService(runtime: runtime, config: c, log: log)
        let reload = ReloadOnHangup(runtime: runtime, tokens: tokens, https: https, config: c, log: log)
        // Graceful shutdown runs in reverse order: the site hands its office over first,
        // while the HTTP probes still answer (load balancers see /primary go 503).
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: app), .init(service: reload), .init(service: site, successTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm], cancellationSignals: [.sigint], logger: logger))
        log.emit("event=started peer=\(c.listenPeer) http=\(c.listenHTTP)")
        if SQLitePageCache.installation != 0 {
            // Correct, but each commit after a B-tree rebalance scans SQLite's whole cache.
            log.emit("event=sqlite_page_cache_unwrapped rc=\(SQLitePageCache.installation)")
        }
        try await group.run()
        watcher?.stop()
        https?.stop()
        hooks?.stop()
        log.emit("event=stopped")
    }

    func makeRuntime(_ c: SiteConfiguration, log: EventLog, metrics: SiteMetrics, hooks: RoleHooks?) throws -> SiteRuntime {
        func endpoint(_ s: String) -> PeerEndpoint {
            let parts = s.split(separator: ":")
            return PeerEndpoint(host: String(parts[0]), port: UInt16(parts[1]) ?? 0)
        }
        var peers: [SiteID: PeerEndpoint] = [:]
        for s in c.sites where s.id != c.siteID { peers[s.id] = endpoint(s.peerAddress) }
        var transport = TransportSettings(site: c.siteID, clusterID: c.clusterID, listen: endpoint(c.listenPeer), peers: peers)
        transport.peerTimeoutNanoseconds = UInt64(c.peerTimeoutMilliseconds) * 1_000_000
        var settings = NodeSettings(config: c.cluster, site: c.siteID, clusterID: c.clusterID, dataDirectory: c.dataDirectory, transport: transport)
        settings.log = { log.emit($0) }
        settings.walOptions.fsyncObserver = { metrics.fsynced(nanoseconds: $0) }
        settings.onProposal = { metrics.proposed(writes: $0) }
        settings.schemaMigrations = TelehealthSchema.migrations
        settings.walOptions.segmentSize = c.segmentBytes
        settings.walOptions.directIO = c.directIO
        settings.snapshotEveryRecords = c.snapshotEveryRecords
        settings.snapshotLogFraction = c.snapshotLogFraction
        settings.retention = RetentionPolicy(maxBytes: c.retainLogBytes, maxAgeSeconds: c.retainLogHours * 3600)
        settings.onRoleChange = { change in
            metrics.roleChanged(change)
            hooks?.roleChanged(change)
        }
        let files = TLSFiles(certificate: c.tlsCertificate, privateKey: c.tlsPrivateKey, certificateAuthority: c.tlsCA, allowTLS12: c.allowTLS12)
        return try SiteRuntime(settings: settings, tls: try TLSContext(files: files))
    }

}

/// Event lines (`event=name key=value ...`) into swift-log.
struct EventLog: Sendable {
    let logger: Logger
    func emit(_ line: String) { logger.info("\(line)") }
}

/// The site as a service: started with the group; on graceful shutdown (SIGTERM) a primary
/// first hands its office to the most up-to-date connected voter, within the transfer
/// timeout, then the site stops. Other sites just leave.
struct SiteService: Service {
    let runtime: SiteRuntime
    let config: SiteConfiguration
    let log: EventLog

    func run() async throws {
        try runtime.start()
        try? await gracefulShutdown()
        let status = runtime.status
        let connected = Set(runtime.transport.connectedPeers)
        if status.role == .primary {
            let voters = config.sites.filter { $0.id != config.siteID && $0.role == .voter && connected.contains($0.id) }
            // The most up-to-date voter takes over soonest (it needs no catch-up first).
            let target = voters.max { (status.peers[$0.id]?.matchLSN ?? .zero) < (status.peers[$1.id]?.matchLSN ?? .zero) }
            if let target {
                log.emit("event=switchover_on_shutdown to=\(target.id)")
                runtime.transferLeadership(to: target.id)
                let deadline = SiteRuntime.now + UInt64(config.timing.transferTimeout)
                while SiteRuntime.now < deadline && runtime.status.role == .primary { try? await Task.sleep(for: .milliseconds(20)) }
                log.emit("event=switchover_on_shutdown_done handed_over=\(runtime.status.role != .primary)")
            }
        }
        runtime.stop()
    }
}

/// SIGHUP: re-read the TLS files and the API tokens, without dropping the cluster.
struct ReloadOnHangup: Service {
    let runtime: SiteRuntime
    let tokens: TokenStore
    let https: HTTPSTerminator?
    let config: SiteConfiguration
    let log: EventLog

    func run() async throws {
        signal(SIGHUP, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        let stream = AsyncStream<Void> { continuation in
            source.setEventHandler { continuation.yield() }
            source.resume()
        }
        defer { source.cancel() }
        for await _ in stream.cancelOnGracefulShutdown() {
            do { try runtime.transport.reloadTLS() } catch { log.emit("event=tls_reload_failed reason=\"\(error)\"") }
            if let https {
                let files = TLSFiles(certificate: config.tlsCertificate, privateKey: config.tlsPrivateKey, certificateAuthority: config.tlsCA,
                                     allowTLS12: true)
                do { https.reload(context: try .httpsServer(files: files)) } catch { log.emit("event=https_reload_failed reason=\"\(error)\"") }
            }
            do {
                try tokens.reload()
                log.emit("event=tokens_reloaded")
            } catch {
                log.emit("event=tokens_reload_failed reason=\"\(error)\"")
            }
        }
    }
}
