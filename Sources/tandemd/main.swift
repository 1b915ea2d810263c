import ArgumentParser
import Foundation
import TandemModel
import TandemStore

/// The site daemon. This build opens and recovers a site's storage (log recovery and
/// database reconciliation, as at every start) and reports it; replication, the HTTP API
/// and configuration files come with the daemon issue.
@main
struct Tandemd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandemd",
        abstract: "Tandem site daemon (this build: start-up recovery of a site's storage).")

    @Option(help: "The site's data directory.") var dataDir: String
    @Option(help: "The cluster id (a UUID).") var clusterId: String

    func run() async throws {
        guard let cluster = ClusterID(clusterId) else { throw ValidationError("--cluster-id must be a UUID, got \"\(clusterId)\"") }
        let started = monotonicNanoseconds()
        let storage = try SiteStorage.open(dataDirectory: dataDir, clusterID: cluster)
        defer { storage.close() }
        let ms = Double(monotonicNanoseconds() - started) / 1e6
        print("event=recovered data_dir=\(dataDir) log_first_lsn=\(storage.log.firstLSN) log_last_lsn=\(storage.log.lastLSN) "
              + "applied_lsn=\(storage.store.appliedLSN) torn_bytes_removed=\(storage.log.recovery.tornBytesRemoved) "
              + "reconciliation=\"\(storage.openReport.joined(separator: "; "))\" duration_ms=\(Int(ms))")
    }
}
