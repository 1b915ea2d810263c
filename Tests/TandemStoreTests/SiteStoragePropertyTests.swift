import Foundation
import Testing
import TandemModel
import TandemWAL
@testable import TandemStore

/// Random sequences of writes, commits, crashes (also between executing a write and
/// logging it), depositions with suffix truncation, snapshots and snapshot restores.
/// After every step the site's database at the committed LSN must equal a reference
/// that only ever applied the committed log from the start.
@Suite("Site storage property")
struct SiteStoragePropertyTests {
    static let schema = WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT, n INTEGER)")])

    func randomBatch(_ rng: inout SeededRandom, allowSchema: Bool) -> WriteBatch {
        if allowSchema && rng.chance(0.03) {
            let name = "idx_\(rng.next() % 1_000_000)"
            return WriteBatch([SQLStatement("CREATE INDEX IF NOT EXISTS \(name) ON kv (n)")])
        }
        var statements: [SQLStatement] = []
        for _ in 0..<Int(1 + rng.next() % 3) {
            let k = Int64(rng.next() % 40)
            switch rng.next() % 4 {
            case 0, 1:
                statements.append(SQLStatement("INSERT OR REPLACE INTO kv (k, v, n) VALUES (?, hex(randomblob(6)), ?)",
                                               [.integer(k), .integer(Int64(rng.next() % 1000))]))
            case 2:
                statements.append(SQLStatement("UPDATE kv SET n = n + abs(random() % 7), v = v || 'x' WHERE k = ?", [.integer(k)]))
            default:
                statements.append(SQLStatement("DELETE FROM kv WHERE k = ?", [.integer(k)]))
            }
        }
        return WriteBatch(statements)
    }

    @Test("the database always equals the committed log applied from the start", arguments: Array(UInt64(1)...12))
    func committedStateIsPreserved(seed: UInt64) async throws {
        let dir = TempDir("prop"); defer { dir.cleanup() }
        var rng = SeededRandom(seed: seed)
        var walOptions = WALOptions()
        walOptions.segmentSize = 16 << 10  // many segments, so prefix removal happens
        let data = dir.sub("site")
        var site = try SiteStorage.bootstrap(dataDirectory: data, clusterID: cluster, walOptions: walOptions)
        // The reference applies only committed records, in order, from the start.
        let reference = try StateStore.create(directory: dir.sub("reference"), clusterID: cluster)
        var committedLSN = LSN.zero
        var term = Term(1)
        var isPrimary = true
        var trace: [String] = []

        // Bootstrap: the schema commits first.
        let (first, durable) = try site.execute(Self.schema, term: term)
        _ = try await durable()
        committedLSN = first.record.lsn
        try site.applyCommitted(through: committedLSN)
        try reference.apply([first.record])

        func commit(through lsn: LSN) throws {
            guard lsn > committedLSN else { return }
            let records = try site.log.read(from: committedLSN.next, maxBytes: 1 << 30).filter { $0.lsn <= lsn }
            try reference.apply(records)
            committedLSN = lsn
            try site.applyCommitted(through: lsn)
        }

        func check(_ step: Int) throws {
            let store = site.store
            #expect(store.appliedLSN >= committedLSN, "step \(step): applied \(store.appliedLSN) < committed \(committedLSN)\n\(trace.suffix(8).joined(separator: "\n"))")
            if store.appliedLSN == committedLSN {
                #expect(try store.stateHash() == reference.stateHash(), "seed \(seed) step \(step)\n\(trace.suffix(8).joined(separator: "\n"))")
            }
            // The retained log agrees with the committed history.
            if site.log.firstLSN <= committedLSN {
                let mine = try site.log.read(from: site.log.firstLSN, maxBytes: 1 << 30).filter { $0.lsn <= committedLSN }
                #expect(mine.count == Int(committedLSN.rawValue - site.log.firstLSN.rawValue + 1), "step \(step)")
            }
        }

        for step in 0..<160 {
            let roll = rng.next() % 100
            if isPrimary {
                switch roll {
                case 0..<45:
                    let (e, durable) = try execOrNil(site, randomBatch(&rng, allowSchema: true), term)
                    if let e {
                        _ = try await durable()
                        trace.append("write \(e.record.lsn) \(e.record.kind)")
                    }
                case 45..<60:
                    let last = site.log.lastLSN
                    if last > committedLSN {
                        let to = LSN(committedLSN.rawValue + 1 + rng.next() % (last.rawValue - committedLSN.rawValue))
                        try commit(through: to)
                        trace.append("commit \(to)")
                    }
                case 60..<70:
                    // Crash after the database changed but before the record was logged.
                    let batch = randomBatch(&rng, allowSchema: true)
                    let lsn = site.store.appliedLSN.next
                    _ = try? site.store.execute(batch, lsn: lsn, term: term)
                    site.close()
                    site = try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: walOptions)
                    #expect(site.store.appliedLSN == site.log.lastLSN, "the unlogged write was undone")
                    try site.applyCommitted(through: committedLSN)
                    trace.append("crash before logging \(lsn): \(site.openReport)")
                case 70..<78:
                    site.close()
                    site = try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: walOptions)
                    try site.applyCommitted(through: committedLSN)
                    trace.append("crash")
                case 78..<88:
                    // Deposed: the uncommitted tail goes.
                    try site.truncate(after: committedLSN)
                    isPrimary = false
                    term = Term(term.rawValue + 1)
                    trace.append("deposed at \(committedLSN)")
                default:
                    do {
                        let info = try site.takeSnapshot(retention: .removeAllCovered)
                        trace.append("snapshot at \(info.lsn), log from \(site.log.firstLSN)")
                    } catch let e as StoreError where e.description.contains("schema change is uncommitted") {
                        trace.append("snapshot refused: schema change in flight")
                    }
                }
            } else {
                switch roll {
                case 0..<50:
                    // Another primary commits a write; this site receives and applies it.
                    let batch = randomBatch(&rng, allowSchema: false)
                    if let e = try? reference.execute(batch, lsn: committedLSN.next, term: term) {
                        reference.markCommitted(through: e.record.lsn)
                        try await site.appendReplicated([e.record])
                        committedLSN = e.record.lsn
                        try site.applyCommitted(through: committedLSN)
                        trace.append("replicated \(e.record.lsn)")
                    }
                case 50..<62:
                    site.close()
                    site = try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: walOptions)
                    try site.applyCommitted(through: committedLSN)
                    trace.append("crash (replica)")
                case 62..<74:
                    // Rebuilt from a peer's snapshot.
                    let path = dir.sub("peer.tsnap")
                    try reference.createSnapshot(at: path)
                    try site.installSnapshot(from: path)
                    trace.append("restored snapshot at \(site.store.appliedLSN)")
                default:
                    term = Term(term.rawValue + 1)
                    isPrimary = true
                    trace.append("elected in term \(term)")
                }
            }
            try check(step)
        }
        if ProcessInfo.processInfo.environment["TANDEM_TRACE"] != nil { print(trace.joined(separator: "\n")) }
        // Finally, depose and compare whatever is left.
        try site.truncate(after: committedLSN)
        #expect(try site.store.stateHash() == reference.stateHash())
        site.close()
    }

    func execOrNil(_ site: SiteStorage, _ batch: WriteBatch, _ term: Term) throws -> (Execution?, @Sendable () async throws -> LSN) {
        do {
            let (e, d) = try site.execute(batch, term: term)
            return (e, d)
        } catch let e as StoreError where e.code == "constraint" || e.code == "sql_error" {
            return (nil, { LSN.zero })
        }
    }
}

@Suite("Data directory lock")
struct DataDirectoryLockTests {
    @Test("a data directory in use is refused with a reason; once closed it opens again at once")
    func oneOpenerAtATime() throws {
        let dir = TempDir("lock"); defer { dir.cleanup() }
        let data = dir.sub("site")
        let site = try SiteStorage.bootstrap(dataDirectory: data, clusterID: cluster)
        do {
            _ = try SiteStorage.open(dataDirectory: data, clusterID: cluster)
            Issue.record("a second opener was let in while the site was open")
        } catch {
            #expect("\(error)".contains("is in use by another process"), "\(error)")
        }
        site.close()
        let again = try SiteStorage.open(dataDirectory: data, clusterID: cluster)
        again.close()
    }
}
