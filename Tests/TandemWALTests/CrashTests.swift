import Foundation
import Testing
import TandemModel
@testable import TandemWAL

/// Crashes at every byte of the final batch, and damage to durable batches.
@Suite("Write-ahead log recovery")
struct CrashTests {
    /// Builds a log of 6 durable batches in one segment and returns the segment's bytes,
    /// the records, and the offsets of the batches.
    func buildLog(_ dir: TempDir, preallocate: Bool, lastBatch: Int = 30) async throws -> (bytes: [UInt8], records: [LogRecord], offsets: [Int], end: Int) {
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions(preallocate: preallocate))
        var records: [LogRecord] = []
        for b in 0..<6 {
            // The last batch spans more than one 4 KiB block.
            let batch = (1...(b == 5 ? lastBatch : 4)).map { record(UInt64(records.count + $0), size: b == 5 ? 180 : 60) }
            records.append(contentsOf: batch)
            try await log.append(batch)
        }
        let offsets = log.batchOffsetsForTesting
        let end = log.byteSize
        log.close()
        return (fileBytes(dir.file("0000000000000001.wal")), records, offsets, end)
    }

    func reopen(_ dir: TempDir, preallocate: Bool) throws -> WriteAheadLog {
        try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions(preallocate: preallocate))
    }

    @Test("a cut at every byte offset of the last batch opens at the last durable record", arguments: [true, false])
    func cutEveryOffset(preallocate: Bool) async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let (bytes, records, offsets, end) = try await buildLog(dir, preallocate: preallocate, lastBatch: 3)
        let lastStart = offsets[offsets.count - 1]
        let durableBefore = records.count - 3
        let seg = dir.file("0000000000000001.wal")
        for cut in lastStart..<end {
            writeBytes(Array(bytes[0..<cut]), seg)
            let log = try reopen(dir, preallocate: preallocate)
            #expect(log.lastLSN == LSN(UInt64(durableBefore)), "cut at \(cut)")
            #expect(try readAll(log) == Array(records[0..<durableBefore]))
            // The log keeps working after the repair.
            try await log.append([record(UInt64(durableBefore + 1), size: 10)])
            log.close()
        }
        // Uncut, everything is there.
        writeBytes(bytes, seg)
        let log = try reopen(dir, preallocate: preallocate)
        defer { log.close() }
        #expect(try readAll(log) == records)
    }

    @Test("the last batch's tail overwritten with zeros or random bytes is cut off, with a .broken copy")
    func overwrittenTail() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let (bytes, records, offsets, end) = try await buildLog(dir, preallocate: true)
        let lastStart = offsets[offsets.count - 1]
        let seg = dir.file("0000000000000001.wal")
        var rng = SystemRandomNumberGenerator()
        for from in stride(from: lastStart, to: end, by: 7) {
            for random in [false, true] {
                var damaged = bytes
                for i in from..<end { damaged[i] = random ? UInt8.random(in: 0...255, using: &rng) : 0 }
                writeBytes(damaged, seg)
                let log = try reopen(dir, preallocate: true)
                #expect(log.lastLSN == LSN(UInt64(records.count - 30)), "damage from \(from), random: \(random)")
                if log.recovery.tornBytesRemoved > 0 {
                    #expect(FileManager.default.fileExists(atPath: seg + ".broken"))
                }
                log.close()
            }
        }
    }

    @Test("a disk that kept the later blocks of the last batch and lost the first is a torn tail")
    func lostEarlierBlock() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let (bytes, records, offsets, end) = try await buildLog(dir, preallocate: true)
        let lastStart = offsets[offsets.count - 1]
        #expect(end - lastStart > 4096)
        var damaged = bytes
        let blockEnd = (lastStart / 4096 + 1) * 4096
        for i in lastStart..<blockEnd { damaged[i] = 0 }
        writeBytes(damaged, dir.file("0000000000000001.wal"))
        let log = try reopen(dir, preallocate: true)
        defer { log.close() }
        #expect(log.lastLSN == LSN(UInt64(records.count - 30)))
        #expect(log.recovery.tornBytesRemoved > 0)
    }

    @Test("a flipped byte in an earlier, durable batch fails the open naming segment and offset, and changes nothing")
    func corruptionInDurableBatch() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let (bytes, records, offsets, _) = try await buildLog(dir, preallocate: true)
        let seg = dir.file("0000000000000001.wal")
        _ = records
        for (index, start) in offsets.dropLast().enumerated() {
            // One flip in the header and one in the body of each earlier batch.
            for position in [start + 5, start + 40] {
                var damaged = bytes
                damaged[position] ^= 0x20
                writeBytes(damaged, seg)
                do {
                    let log = try reopen(dir, preallocate: true)
                    log.close()
                    Issue.record("open succeeded despite damage at \(position) in batch \(index)")
                } catch let WALError.corruption(segment, offset, _, _) {
                    #expect(segment == "0000000000000001.wal")
                    #expect(offset == start)
                }
                #expect(fileBytes(seg) == damaged, "the damaged file is left as it was")
                #expect(!FileManager.default.fileExists(atPath: seg + ".broken"))
            }
        }
    }

    @Test("damage in a segment that is not the last is corruption")
    func corruptionInEarlierSegment() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        for b in 0..<40 { try await log.append((1...10).map { record(UInt64(b * 10 + $0), size: 200) }) }
        #expect(log.segmentCount >= 2)
        log.close()
        let seg = dir.file("0000000000000001.wal")
        var bytes = fileBytes(seg)
        // Damage the very last batch of the first segment.
        let firstSegmentEnd = bytes.lastIndex(where: { $0 != 0 })!
        bytes[firstSegmentEnd - 3] ^= 0xFF
        writeBytes(bytes, seg)
        #expect(throws: WALError.self) { _ = try reopen(dir, preallocate: true) }
        #expect(fileBytes(seg) == bytes)
    }

}

/// Crashes in the middle of maintenance: what each step leaves on disk must recover to a
/// contiguous log that loses nothing still wanted.
@Suite("Write-ahead log maintenance crashes")
struct MaintenanceCrashTests {
    func makeLog(_ dir: TempDir, batches: Int = 40) async throws -> [LogRecord] {
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        var records: [LogRecord] = []
        for b in 0..<batches {
            let batch = (1...10).map { record(UInt64(b * 10 + $0), size: 200) }
            records.append(contentsOf: batch)
            try await log.append(batch)
        }
        log.close()
        return records
    }

    func segments(_ dir: TempDir) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasSuffix(".wal") }.sorted()
    }

    @Test("a suffix truncation interrupted after deleting later segments recovers to a contiguous prefix")
    func truncationAfterDeletingSegments() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let records = try await makeLog(dir, batches: 100)
        let segs = segments(dir)
        #expect(segs.count >= 3)
        // The crash came after the newest segments were deleted, before the cut.
        for s in segs.suffix(2) { try FileManager.default.removeItem(atPath: dir.file(s)) }
        let log = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { log.close() }
        let kept = try readAll(log)
        #expect(kept == Array(records.prefix(kept.count)), "a prefix of what was there, with no gap")
        #expect(!kept.isEmpty)
    }

    @Test("a segment rewrite interrupted before its rename leaves the old segment, and the temporary file is removed")
    func rewriteBeforeRename() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let records = try await makeLog(dir, batches: 5)
        let seg = dir.file(segments(dir)[0])
        // A half-written rewrite.
        _ = FileManager.default.createFile(atPath: seg + ".tmp", contents: Data(fileBytes(seg).prefix(300)))
        let log = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { log.close() }
        #expect(try readAll(log) == records)
        #expect(!FileManager.default.fileExists(atPath: seg + ".tmp"))
    }

    @Test("a reset interrupted after moving a segment aside, before the new segment exists, puts it back")
    func resetInterrupted() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let records = try await makeLog(dir, batches: 5)
        let seg = dir.file(segments(dir)[0])
        try FileManager.default.moveItem(atPath: seg, toPath: seg + ".obsolete")
        let log = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { log.close() }
        #expect(try readAll(log) == records)
    }

    @Test("a reset interrupted after its new segment was made drops the segments before it")
    func resetAfterNewSegment() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        _ = try await makeLog(dir, batches: 30)
        let log = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        let before = segments(dir)
        // Make the reset segment as reset() does, then "crash" before deleting the old ones.
        _ = try WriteAheadLog.createSegment(directory: dir.path, clusterID: testCluster, options: smallOptions(),
                                            firstLSN: LSN(5001), previousTerm: Term(4), isReset: true)
        log.close()
        #expect(segments(dir).count == before.count + 1)
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(again.firstLSN == LSN(5001) && again.lastLSN == LSN(5000))
        #expect(again.term(at: LSN(5000)) == Term(4))
        #expect(segments(dir).count == 1)
        #expect(again.recovery.obsoleteSegmentsRemoved == before.count)
    }
}
