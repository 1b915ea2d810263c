import ArgumentParser
import Foundation
import TandemModel
import TandemStore
import TandemWAL

/// The operator's command line: status, switchover, export and verify talk to running sites
/// over their HTTP API; init, inspect, snapshot and rebuild work on a stopped site's data
/// directory.
@main
struct TandemCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandemctl",
        abstract: "Operate a Tandem site.",
        subcommands: [Status.self, Switchover.self, Init.self, CheckConfig.self, Export.self, Verify.self, Rebuild.self, Token.self,
                      Inspect.self, DemoWrites.self, SnapshotCommand.self])
}

struct SiteOptions: ParsableArguments {
    @Option(help: "The site's data directory.") var dataDir: String
    @Option(help: "The cluster id (a UUID).") var clusterId: String

    func cluster() throws -> ClusterID {
        guard let id = ClusterID(clusterId) else { throw ValidationError("--cluster-id must be a UUID, got \"\(clusterId)\"") }
        return id
    }
}

struct Init: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new site's storage with the telehealth schema. Refuses existing data.")
    @Option(help: "The site's data directory.") var dataDir: String
    @Option(help: "The cluster id (a UUID); a new one when omitted.") var clusterId: String?

    func run() async throws {
        let cluster: ClusterID
        if let clusterId {
            guard let c = ClusterID(clusterId) else { throw ValidationError("--cluster-id must be a UUID, got \"\(clusterId)\"") }
            cluster = c
        } else {
            cluster = .random()
        }
        let site = try SiteStorage.bootstrap(dataDirectory: dataDir, clusterID: cluster)
        defer { site.close() }
        for migration in TelehealthSchema.migrations {
            let (_, durable) = try site.execute(migration, term: Term(1))
            let lsn = try await durable()
            try site.applyCommitted(through: lsn)
        }
        print("initialized site storage in \(dataDir)")
        print("cluster id: \(cluster)")
        print("schema version: \(site.store.schemaVersion), LSN \(site.store.appliedLSN)")
    }
}

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Open a stopped site's storage (recovering it) and report its state.")
    @OptionGroup var site: SiteOptions
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        let storage = try SiteStorage.open(dataDirectory: site.dataDir, clusterID: try site.cluster())
        defer { storage.close() }
        let log = storage.log
        let report: [String: Any] = [
            "cluster_id": storage.clusterID.description,
            "log_first_lsn": log.firstLSN.rawValue,
            "log_last_lsn": log.lastLSN.rawValue,
            "log_last_term": log.lastTerm.rawValue,
            "log_segments": log.segmentCount,
            "log_bytes": log.byteSize,
            "recovered_records": log.recovery.records,
            "torn_bytes_removed": log.recovery.tornBytesRemoved,
            "applied_lsn": storage.store.appliedLSN.rawValue,
            "applied_term": storage.store.appliedTerm.rawValue,
            "schema_version": storage.store.schemaVersion,
            "state_sha256": try storage.store.stateHash(),
            "reconciliation": storage.openReport,
        ]
        if json {
            let data = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys, .prettyPrinted])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for key in report.keys.sorted() { print("\(key): \(report[key] ?? "")") }
        }
    }
}

struct DemoWrites: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo-writes",
        abstract: "Book a few teleconsultations on a stopped single site, then list the day's appointments.")
    @OptionGroup var site: SiteOptions

    func run() async throws {
        let storage = try SiteStorage.open(dataDirectory: site.dataDir, clusterID: try site.cluster())
        defer { storage.close() }
        let term = max(storage.log.lastTerm, Term(1))
        func write(_ batch: WriteBatch) async throws -> Execution {
            let (execution, durable) = try storage.execute(batch, term: term)
            try storage.applyCommitted(through: try await durable())
            return execution
        }
        _ = try await write(WriteBatch([
            SQLStatement("INSERT OR IGNORE INTO practitioners (reference, name, specialty) VALUES ('RPPS-10001', 'Dr Weber', 'neurology')"),
            SQLStatement("INSERT OR IGNORE INTO patients (reference) VALUES ('IPP-2021-0001'), ('IPP-2021-0002')"),
        ]))
        for (i, patient) in ["IPP-2021-0001", "IPP-2021-0002"].enumerated() {
            let e = try await write(WriteBatch([SQLStatement("""
                INSERT INTO appointments (practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site)
                SELECT p.id, q.id, ?, 20, 'video', 'sbg' FROM practitioners p, patients q WHERE p.reference = 'RPPS-10001' AND q.reference = ?
                """, [.text("2021-03-10T0\(8 + i):00:00Z"), .text(patient)])]))
            print("booked appointment \(e.results[0].lastInsertRowID) at LSN \(e.record.lsn)")
        }
        let day = try storage.store.query(SQLStatement("""
            SELECT a.id, a.starts_at, a.mode, q.reference FROM appointments a JOIN patients q ON q.id = a.patient_id
            WHERE a.starts_at >= '2021-03-10' AND a.starts_at < '2021-03-11' ORDER BY a.starts_at
            """))
        print("appointments on 2021-03-10 (as of LSN \(day.appliedLSN)):")
        for row in day.rows { print("  " + row.map(\.description).joined(separator: "  ")) }
    }
}

struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot", abstract: "Create or restore a snapshot of a stopped site.",
                                                    subcommands: [Create.self, Restore.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a snapshot of the committed state to FILE.")
        @OptionGroup var site: SiteOptions
        @Argument(help: "The snapshot file to write.") var file: String

        func run() async throws {
            let storage = try SiteStorage.open(dataDirectory: site.dataDir, clusterID: try site.cluster())
            defer { storage.close() }
            storage.store.markCommitted(through: storage.store.appliedLSN)
            let info = try storage.store.createSnapshot(at: file) { done, total in
                progress(done, total)
            }
            FileHandle.standardError.write(Data("\n".utf8))
            print("snapshot at LSN \(info.lsn) (term \(info.term)): \(info.rawBytes) bytes of database in \(info.fileBytes) bytes, sha256 \(info.sha256)")
        }
    }

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Replace the site's state with the snapshot FILE; the log restarts after it.")
        @OptionGroup var site: SiteOptions
        @Argument(help: "The snapshot file to install.") var file: String

        func run() async throws {
            let storage = try SiteStorage.open(dataDirectory: site.dataDir, clusterID: try site.cluster())
            defer { storage.close() }
            try storage.installSnapshot(from: file) { done, total in progress(done, total) }
            FileHandle.standardError.write(Data("\n".utf8))
            print("restored: applied LSN \(storage.store.appliedLSN), state sha256 \(try storage.store.stateHash())")
        }
    }
}

/// A one-line progress bar on standard error.
func progress(_ done: Int, _ total: Int) {
    let width = 30
    let filled = total > 0 ? width * done / total : width
    let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
    FileHandle.standardError.write(Data("\r[\(bar)] \(done >> 20)/\(total >> 20) MiB".utf8))
}
