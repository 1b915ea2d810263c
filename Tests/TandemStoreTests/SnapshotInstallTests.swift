import Foundation
import Testing
import TandemModel
import TandemWAL
@testable import TandemStore

/// Installing a peer's snapshot: a bad file changes nothing, and a crash at any step
/// leaves a site that opens, either as it was or as the snapshot's state.
@Suite("Snapshot install")
struct SnapshotInstallTests {
    static let schema = WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")])

    struct Crash: Error {}

    /// A peer's database with `writes` committed rows, and its snapshot at `path`.
    func peerSnapshot(_ dir: TempDir, writes: Int) throws -> (path: String, lsn: LSN, hash: String) {
        let peer = try StateStore.create(directory: dir.sub("peer"), clusterID: cluster)
        _ = try peer.execute(Self.schema, lsn: LSN(1), term: Term(2))
        for i in 0..<writes {
            _ = try peer.execute(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (?, ?)", [.integer(Int64(i)), .text("peer-\(i)")])]),
                                 lsn: peer.appliedLSN.next, term: Term(2))
        }
        peer.markCommitted(through: peer.appliedLSN)
        let path = dir.sub("peer.tsnap")
        let info = try peer.createSnapshot(at: path)
        return (path, info.lsn, try peer.stateHash())
    }

    /// A site with a log of its own (committed, applied) and a local snapshot.
    func site(_ data: String, writes: Int) async throws -> SiteStorage {
        var options = WALOptions()
        options.segmentSize = 16 << 10
        let site = try SiteStorage.bootstrap(dataDirectory: data, clusterID: cluster, walOptions: options)
        let (first, durable) = try site.execute(Self.schema, term: Term(1))
        _ = try await durable()
        var last = first.record.lsn
        for i in 0..<writes {
            let (e, d) = try site.execute(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (?, ?)", [.integer(Int64(i)), .text(String(repeating: "s", count: 300))])]),
                                          term: Term(1))
            _ = try await d()
            last = e.record.lsn
        }
        site.store.markCommitted(through: last)
        try site.takeSnapshot(retention: .removeAllCovered)
        return site
    }

    static func reopen(_ data: String) throws -> SiteStorage {
        var options = WALOptions()
        options.segmentSize = 16 << 10
        return try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: options)
    }

    @Test("a damaged or mismatched snapshot is refused before the site gives up anything it holds")
    func badSnapshotChangesNothing() async throws {
        let dir = TempDir("bad-snap"); defer { dir.cleanup() }
        let peer = try peerSnapshot(dir, writes: 40)
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: peer.path)))
        var damaged: [(String, [UInt8])] = []
        var flipped = good
        flipped[good.count / 2] ^= 0x40
        damaged.append(("a byte flipped in a chunk", flipped))
        damaged.append(("cut short", Array(good[0..<(good.count - 100)])))
        // The header says another term than the database holds (its CRC made right).
        var info = try SnapshotFormat.readHeader(path: peer.path).info
        info.term = Term(99)
        damaged.append(("a header naming another term", SnapshotFormat.encodeHeader(info, chunkSize: SnapshotFormat.chunkSize) + good[SnapshotFormat.headerSize...]))
        let data = dir.sub("site")
        var site = try await self.site(data, writes: 30)
        let applied = site.store.appliedLSN, hash = try site.store.stateHash()
        let local = try [UInt8](Data(contentsOf: URL(fileURLWithPath: site.snapshotPath)))
        let logRange = (site.log.firstLSN, site.log.lastLSN)
        for (what, bytes) in damaged {
            let path = dir.sub("incoming.tsnap")
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            #expect(throws: StoreError.self, "\(what)") { try site.installSnapshot(from: path) }
            #expect(try site.store.appliedLSN == applied && site.store.stateHash() == hash, "\(what): the database changed")
            #expect(site.log.firstLSN == logRange.0 && site.log.lastLSN == logRange.1, "\(what): the log changed")
            #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: site.snapshotPath))) == local, "\(what): the local snapshot changed")
            #expect(!site.installInterrupted && !FileManager.default.fileExists(atPath: site.installIntentPath), "\(what)")
            site.close()
            site = try Self.reopen(data)
            #expect(try site.store.appliedLSN == applied && site.store.stateHash() == hash, "\(what): after reopening")
        }
        // The good file still installs afterwards.
        try site.installSnapshot(from: peer.path)
        #expect(try site.store.appliedLSN == peer.lsn && site.store.stateHash() == peer.hash)
        site.close()
    }

    @Test("a header whose LSN, term or size no conversion can hold is refused, not trapped on")
    func hugeHeaderValues() throws {
        let dir = TempDir("huge-snap"); defer { dir.cleanup() }
        let peer = try peerSnapshot(dir, writes: 3)
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: peer.path)))
        let base = try SnapshotFormat.readHeader(path: peer.path).info
        for edit in [{ (i: inout SnapshotInfo) in i.lsn = LSN(1 << 63) }, { $0.term = Term(UInt64.max) }] {
            var info = base
            edit(&info)
            let bytes = SnapshotFormat.encodeHeader(info, chunkSize: SnapshotFormat.chunkSize) + good[SnapshotFormat.headerSize...]
            #expect(throws: StoreError.self) { try SnapshotFormat.decodeHeader(Array(bytes[0..<64]), fileBytes: bytes.count, path: "x") }
        }
        // The size field, written by hand (SnapshotInfo holds an Int).
        var header = Array(good[0..<64])
        for i in 48..<56 { header[i] = 0xFF }
        let crc = CRC32C.checksum(Array(header[0..<60]))
        for i in 0..<4 { header[60 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        #expect(throws: StoreError.self) { try SnapshotFormat.decodeHeader(header, fileBytes: good.count, path: "x") }
    }

    /// `diverged`: the site stands at the snapshot's very LSN, in another term (records
    /// lost in an async window), with a local snapshot there: the same LSN must not pass
    /// for the same snapshot.
    @Test("a crash at any step of an install leaves a site that opens as it was or as the snapshot's state", arguments: [false, true])
    func crashAtEveryStep(diverged: Bool) async throws {
        var step = 0
        var seen: [String] = []
        while true {
            let dir = TempDir("crash-install"); defer { dir.cleanup() }
            let peer = try peerSnapshot(dir, writes: 60)
            let data = dir.sub("site")
            var site = try await self.site(data, writes: diverged ? 60 : 30)
            let applied = site.store.appliedLSN, hash = try site.store.stateHash()
            let logRange = (site.log.firstLSN, site.log.lastLSN)
            #expect(!diverged || applied == peer.lsn)
            var calls = 0
            var crashedAt: String?
            site.crashPointInInstall = { name in
                calls += 1
                if calls == step + 1 {
                    crashedAt = name
                    throw Crash()
                }
            }
            do { try site.installSnapshot(from: peer.path) } catch {}
            site.close()
            guard let at = crashedAt else { break }
            seen.append(at)
            site = try Self.reopen(data)
            #expect(!FileManager.default.fileExists(atPath: site.installIntentPath), "crash after \(at): the open left the install unfinished")
            if at == "verified" || at == "intent written" {
                #expect(try site.store.appliedLSN == applied && site.store.stateHash() == hash, "crash after \(at): not as it was")
                #expect(site.log.firstLSN == logRange.0 && site.log.lastLSN == logRange.1, "crash after \(at): the log changed")
            } else {
                #expect(try site.store.appliedLSN == peer.lsn && site.store.stateHash() == peer.hash, "crash after \(at): not the snapshot's state")
                #expect(site.log.firstLSN == peer.lsn.next && site.log.lastLSN == peer.lsn && site.log.term(at: peer.lsn) == Term(2),
                        "crash after \(at): the log did not restart after the snapshot")
            }
            // Either way the site goes on: the next record after what it holds is logged.
            let next = LogRecord(term: Term(2), lsn: site.log.lastLSN.next, kind: .changeset, payload: [])
            try await site.appendReplicated([next])
            site.close()
            step += 1
        }
        #expect(seen.contains("snapshot placed") && seen.contains("log reset") && seen.contains { $0.hasPrefix("removed ") },
                "crash points reached: \(seen)")
    }
}

@Suite("Site storage after a power cut")
struct PowerCutTests {
    @Test("a database that lost transactions behind the retained log is rebuilt from the local snapshot past the log's first record")
    func databaseBehindRetainedLog() async throws {
        let dir = TempDir("power-cut"); defer { dir.cleanup() }
        let data = dir.sub("site")
        var options = WALOptions()
        options.segmentSize = 16 << 10
        var site = try SiteStorage.bootstrap(dataDirectory: data, clusterID: cluster, walOptions: options)
        func write(_ i: Int) async throws -> LSN {
            let batch = i == 0 ? SnapshotInstallTests.schema
                : WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (?, ?)", [.integer(Int64(i)), .text(String(repeating: "p", count: 300))])])
            let (e, durable) = try site.execute(batch, term: Term(1))
            _ = try await durable()
            site.store.markCommitted(through: e.record.lsn)
            return e.record.lsn
        }
        for i in 0..<5 { _ = try await write(i) }
        // The database as a power cut will leave it: SQLite's state of this moment.
        site.close()
        try FileManager.default.copyItem(atPath: data + "/state", toPath: dir.sub("state-early"))
        site = try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: options)
        var last = LSN.zero
        for i in 5..<200 { last = try await write(i) }
        let info = try site.takeSnapshot(retention: .removeAllCovered)
        for i in 200..<210 { last = try await write(i) }
        let hash = try site.store.stateHash()
        #expect(site.log.firstLSN.previous < info.lsn && site.log.firstLSN.previous > LSN(5), "the setting this test needs")
        site.close()
        try FileManager.default.removeItem(atPath: data + "/state")
        try FileManager.default.moveItem(atPath: dir.sub("state-early"), toPath: data + "/state")
        site = try SiteStorage.open(dataDirectory: data, clusterID: cluster, walOptions: options)
        defer { site.close() }
        #expect(site.store.appliedLSN == info.lsn, "\(site.openReport)")
        try site.applyCommitted(through: last)
        #expect(try site.store.stateHash() == hash)
    }
}
