import Foundation
import Testing
import TandemModel
@testable import TandemStore

@Suite("Snapshots")
struct SnapshotTests {
    @Test("a snapshot holds the committed state only, restores to the same hash, and reports progress")
    func roundTrip() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(primary)
        // Enough data for several chunks, with documents that do not compress.
        var rng = SeededRandom(seed: 7)
        for i in 1...40 {
            let bytes = (0..<60_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let sha = SHA256Hasher.hex(SHA256Hasher.digest(bytes))
            _ = try primary.execute(WriteBatch([SQLStatement(
                "INSERT INTO documents (id, patient_id, kind, content_type, size, sha256, bytes) VALUES (?, 1, 'report', 'application/pdf', ?, ?, ?)",
                [.integer(Int64(i)), .integer(Int64(bytes.count)), .text(sha), .blob(bytes)])]), lsn: primary.appliedLSN.next, term: Term(2))
        }
        let committed = primary.appliedLSN
        primary.markCommitted(through: committed)
        let committedHash = try primary.stateHash()
        // A speculative tail the snapshot must not contain.
        _ = try primary.execute(booking(1), lsn: primary.appliedLSN.next, term: Term(2))
        let steps = Box<[Int]>([])
        let info = try primary.createSnapshot(at: dir.sub("snap.tsnap")) { done, _ in steps.value.append(done) }
        #expect(info.lsn == committed && info.term == Term(2))
        #expect(steps.value.count >= 2 && steps.value.last == info.rawBytes)
        #expect(!FileManager.default.fileExists(atPath: dir.sub("snap.tsnap.tmp")))
        #expect(try primary.stateHash() != committedHash, "the source keeps its speculative tail")

        let restored = try StateStore.installSnapshot(from: dir.sub("snap.tsnap"), directory: dir.sub("r"), clusterID: cluster)
        #expect(restored.appliedLSN == committed)
        #expect(try restored.stateHash() == committedHash)
        #expect(try restored.undoDepth() == 0)
        // And the restored site goes on applying the log from the snapshot's LSN.
        let next = try primary.execute(booking(2), lsn: primary.appliedLSN.next, term: Term(2))
        try primary.rollback(to: committed)
        let redo = try primary.execute(booking(2), lsn: committed.next, term: Term(2))
        _ = next
        try restored.apply([redo.record])
        #expect(try restored.stateHash() == primary.stateHash())
    }

    @Test("a damaged or foreign snapshot is refused and the current state stays")
    func damaged() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(primary)
        primary.markCommitted(through: primary.appliedLSN)
        let snap = dir.sub("snap.tsnap")
        try primary.createSnapshot(at: snap)
        let good = [UInt8](FileManager.default.contents(atPath: snap)!)
        let target = try telehealthStore(dir.sub("r"))
        let targetHash = try target.stateHash()
        for (label, mutate) in [("flipped chunk byte", { (b: inout [UInt8]) in b[100] ^= 1 }),
                                ("flipped header byte", { (b: inout [UInt8]) in b[33] ^= 1 }),
                                ("truncated", { (b: inout [UInt8]) in b.removeLast(30) }),
                                ("extra bytes", { (b: inout [UInt8]) in b.append(0) })] as [(String, (inout [UInt8]) -> Void)] {
            var bytes = good
            mutate(&bytes)
            _ = FileManager.default.createFile(atPath: snap, contents: Data(bytes))
            #expect(throws: StoreError.self, "\(label)") {
                _ = try StateStore.installSnapshot(from: snap, directory: dir.sub("r"), clusterID: cluster)
            }
            let again = try StateStore.open(directory: dir.sub("r"), clusterID: cluster)
            #expect(try again.stateHash() == targetHash, "\(label)")
        }
        _ = FileManager.default.createFile(atPath: snap, contents: Data(good))
        #expect(throws: StoreError.self) {
            _ = try StateStore.installSnapshot(from: snap, directory: dir.sub("x"), clusterID: ClusterID.random())
        }
    }
}

final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}
