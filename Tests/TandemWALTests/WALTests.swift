import Foundation
import Synchronization
import Testing
import TandemModel
@testable import TandemWAL

@Suite("Write-ahead log")
struct WALTests {
    @Test("records appended are read back, also after reopening")
    func appendReadReopen() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        let records = (1...500).map { record(UInt64($0), term: UInt64(1 + $0 / 200), size: $0 % 300) }
        for chunk in stride(from: 0, to: records.count, by: 7) {
            try await log.append(Array(records[chunk..<min(chunk + 7, records.count)]))
        }
        #expect(log.lastLSN == LSN(500))
        #expect(log.segmentCount > 1, "a 64 KiB segment size must roll")
        #expect(try readAll(log) == records)
        #expect(log.term(at: LSN(199)) == Term(1))
        #expect(log.term(at: LSN(200)) == Term(2))
        log.close()
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(again.recovery.tornBytesRemoved == 0)
        #expect(try readAll(again) == records)
        #expect(again.term(at: LSN(450)) == Term(3))
        #expect(try again.read(from: LSN(321), maxBytes: 1).map(\.lsn) == [LSN(321)])
    }

    @Test("concurrent appenders share fsyncs and every acknowledged record survives")
    func groupCommit() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        let acknowledged = try await withThrowingTaskGroup(of: [LSN].self) { group in
            for _ in 0..<32 {
                group.addTask {
                    var mine: [LSN] = []
                    for _ in 0..<25 { mine.append(try await log.append(term: Term(1), kind: .changeset, payload: [1, 2, 3])) }
                    return mine
                }
            }
            var all: [LSN] = []
            for try await part in group { all.append(contentsOf: part) }
            return all
        }
        #expect(Set(acknowledged).count == 800)
        log.close()
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(again.lastLSN == LSN(800))
        #expect(again.recovery.records == 800)
        #expect(again.recovery.records > 0)
    }

    @Test("a batch gathered from many appends is byte for byte the batch its records encode to, with every reserved byte zero; each append learns its own last LSN; terms rising inside an append and inside a batch are remembered",
          arguments: [8 << 20, 4096])
    func gatheredBatchesEncodeAsOne(maxBatchBytes: Int) async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var options = smallOptions()
        options.maxBatchBytes = maxBatchBytes  // 4096: the writer takes part of its queue
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: options)
        defer { log.close() }
        final class Appenders: @unchecked Sendable {
            let lock = NSLock()
            var next = LSN(1)
            var term: UInt64 = 1
            var problems: [String] = []
            var done: CheckedContinuation<Void, Never>?
            var running = 24
        }
        let state = Appenders()
        let total: UInt64 = 1_500
        let sizes = [0, 1, 3, 255, 1_000]
        // Callback appenders, as the benchmark's: each appends again from its completion,
        // so batches gather many appends. An append holds one to three records, and now
        // and then the term goes up, also between two records of one append.
        @Sendable func append(_ n: Int) {
            state.lock.lock()
            guard state.next.rawValue <= total else {
                state.running -= 1
                let finished = state.running == 0 ? state.done : nil
                state.lock.unlock()
                finished?.resume()
                return
            }
            var records: [LogRecord] = []
            for _ in 0..<min(1 + n % 3, Int(total - state.next.rawValue + 1)) {
                if state.next.rawValue % 97 == 0 { state.term += 1 }
                let payload = [UInt8](repeating: UInt8(truncatingIfNeeded: n), count: sizes[(n + records.count) % sizes.count])
                records.append(LogRecord(term: Term(state.term), lsn: state.next, kind: .changeset, payload: payload))
                state.next = state.next.next
            }
            let last = records[records.count - 1].lsn
            // Under the appenders' lock, so that LSNs reach the log in order.
            log.append(records) { result in
                if result != .success(last) { state.lock.withLock { state.problems.append("append ending at \(last): \(result)") } }
                append(n + 1)
            }
            state.lock.unlock()
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            state.lock.withLock { state.done = c }
            for a in 0..<24 { append(a * 1_000) }
        }
        #expect(state.problems.isEmpty, "\(state.problems.prefix(3))")
        #expect(log.lastLSN == LSN(total))
        var termsByLSN: [LSN: Term] = [:]
        var batches = 0, gathered = 0, termChangesInsideBatches = 0
        for name in try WriteAheadLog.segmentNames(in: dir.path) {
            let bytes = fileBytes(dir.file(name))
            try bytes.withUnsafeBytes { buf in
                var offset = WALFormat.segmentHeaderSize
                while let header = WALFormat.decodeBatchHeader(buf, at: offset) {
                    let end = offset + WALFormat.batchHeaderSize + header.bodyLength
                    #expect(header.bodyLength + WALFormat.batchHeaderSize <= maxBatchBytes + 3 * (1_000 + WALFormat.recordHeaderSize),
                            "a batch over the limit by more than one append")
                    var records: [LogRecord] = []
                    var at = offset + WALFormat.batchHeaderSize
                    while at < end {
                        let decoded = try #require(WALFormat.decodeRecord(buf, at: at, end: end, verify: true))
                        #expect(buf[at + 25] == 0 && buf[at + 26] == 0 && buf[at + 27] == 0, "reserved bytes of \(decoded.0.lsn)")
                        records.append(decoded.0)
                        at = decoded.1
                    }
                    #expect(records.count == header.count)
                    #expect(records.first?.lsn == header.firstLSN)
                    let alone = WALFormat.encodeBatch(records[...], previousCRC: header.previousCRC)
                    #expect(alone.bytes == Array(bytes[offset..<end]), "batch at \(name):\(offset)")
                    #expect(alone.bodyCRC == header.bodyCRC)
                    for r in records { termsByLSN[r.lsn] = r.term }
                    if Set(records.map(\.term)).count > 1 { termChangesInsideBatches += 1 }
                    batches += 1
                    if records.count > 3 { gathered += 1 }
                    offset = end
                }
            }
        }
        #expect(termsByLSN.count == Int(total))
        #expect(gathered > 0, "no batch gathered more than one append")
        #expect(batches > 1)
        // Term runs are kept for the log's own answers: every LSN's term, as written.
        for (lsn, term) in termsByLSN { #expect(log.term(at: lsn) == term, "term at \(lsn)") }
        #expect(termsByLSN[LSN(total)] == Term(state.term), "the last record carries the highest term")
        #expect(termChangesInsideBatches > 0, "no batch held a change of term")
    }

    @Test("an append too large for one batch's u32 length is refused with the reason, and nothing is written")
    func appendTooLargeForABatch() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { log.close() }
        // 257 records of 16 MiB (the default record limit) sharing one payload buffer:
        // just over 4 GiB counted, 16 MiB in memory.
        let payload = [UInt8](repeating: 7, count: log.options.maxRecordBytes)
        let records = (1...257).map { LogRecord(term: Term(1), lsn: LSN(UInt64($0)), kind: .changeset, payload: payload) }
        let result = Mutex<Result<LSN, WALError>?>(nil)
        log.append(records) { r in result.withLock { $0 = r } }
        guard case let .failure(.appendTooLarge(size, _))? = result.withLock({ $0 }) else {
            Issue.record("expected appendTooLarge, got \(String(describing: result.withLock { $0 }))")
            return
        }
        #expect(size == 257 * (payload.count + WALFormat.recordHeaderSize))
        #expect(log.lastLSN == LSN(0))
        #expect(log.hasRoom(for: [record(1)]))
    }

    @Test("an inline append on an idle log is durable when it returns; mixed with queued appends while the writer is busy, every record lands once, in order")
    func inlineAppends() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        // Idle log: the completion has run (durable) before appendInline returns.
        let done = Counter()
        log.appendInline([record(1)]) { result in
            if case .success(LSN(1)) = result { _ = done.increment() }
        }
        #expect(done.value == 1)
        #expect(log.lastLSN == LSN(1))
        #expect(log.statistics.batches == 1)
        #expect(log.statistics.inlineBatches == 1)

        // One thread numbers records (as the site's loop does) and alternates between
        // inline and queued appends while the writer is busy with earlier ones.
        let acknowledged = Counter()
        let order = OrderCheck()
        let total: UInt64 = 2_000
        for lsn in 2...total {
            let r = record(lsn, size: Int(lsn % 200))
            let completion: @Sendable (Result<LSN, WALError>) -> Void = { result in
                if case let .success(l) = result, l == LSN(lsn) { _ = acknowledged.increment(); order.saw(l) }
            }
            if lsn % 3 == 0 { log.appendInline([r], completion: completion) } else { log.append([r], completion: completion) }
        }
        let deadline = Date().addingTimeInterval(60)
        while acknowledged.value < Int(total) - 1 && Date() < deadline { try await Task.sleep(nanoseconds: 1_000_000) }
        #expect(acknowledged.value == Int(total) - 1, "every append is acknowledged")
        #expect(order.inOrder, "completions are reported in LSN order")
        let stats = log.statistics
        #expect(stats.records == Int(total))
        #expect(stats.batches < Int(total), "queued appends still share batches")
        log.close()
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(again.recovery.tornBytesRemoved == 0)
        #expect(try readAll(again).map(\.lsn) == (1...total).map { LSN($0) })
    }

    @Test("an inline append that would roll the segment goes to the writer thread instead (creating a segment may zero-fill it)")
    func inlineDoesNotRoll() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { log.close() }
        // Fill the first 64 KiB segment to within one record of its end.
        var lsn: UInt64 = 0
        while log.byteSize < (64 << 10) - 2_000 {
            lsn += 1
            try await log.append([record(lsn, size: 1_000)])
        }
        #expect(log.segmentCount == 1)
        let inlineBefore = log.statistics.inlineBatches
        let done = Counter()
        lsn += 1
        log.appendInline([record(lsn, size: 3_000)]) { if case .success = $0 { _ = done.increment() } }
        let deadline = Date().addingTimeInterval(10)
        while done.value == 0 && Date() < deadline { try await Task.sleep(nanoseconds: 1_000_000) }
        #expect(done.value == 1)
        #expect(log.segmentCount == 2, "the record rolled the segment")
        #expect(log.statistics.inlineBatches == inlineBefore, "the writer thread, not the caller, rolled it")
    }

    @Test("an fsync error during an inline append stops the log like one on the writer thread")
    func inlineFsyncFailStop() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let syncs = Counter()
        var opts = smallOptions()
        opts.fsyncFault = { _ in syncs.increment() == 2 ? EIO : nil }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: opts)
        defer { log.close() }
        let failures = Counter()
        log.appendInline([record(1)]) { if case .failure = $0 { _ = failures.increment() } }
        log.appendInline([record(2)]) { if case .failure = $0 { _ = failures.increment() } }
        #expect(failures.value == 1)
        #expect(log.failed != nil)
        log.appendInline([record(3)]) { if case .failure = $0 { _ = failures.increment() } }
        #expect(failures.value == 2, "no append is reported durable after a failed fsync")
        await #expect(throws: WALError.self) { try await log.append([record(3)]) }
        #expect(log.lastLSN == LSN(1))
        #expect(syncs.value == 2, "a failed fsync is never retried")
    }

    @Test("appends that do not follow the log are refused with the reason")
    func admission() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var opts = smallOptions()
        opts.maxRecordBytes = 100
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: opts)
        defer { log.close() }
        try await log.append([record(1, term: 2)])
        await #expect(throws: WALError.nonContiguous(expected: LSN(2), got: LSN(3))) { try await log.append([record(3)]) }
        await #expect(throws: WALError.termRegression(lsn: LSN(2), term: Term(1), previous: Term(2))) {
            try await log.append([record(2, term: 1)])
        }
        await #expect(throws: WALError.recordTooLarge(size: 101, limit: 100)) { try await log.append([record(2, term: 2, size: 101)]) }
        // An empty append has no last LSN to report: refused, not a crash of the writer
        // (it indexed its appends' last record), and the log goes on.
        await #expect(throws: WALError.noRecords) { try await log.append([LogRecord]()) }
        let inline = Mutex<Result<LSN, WALError>?>(nil)
        log.appendInline([]) { r in inline.withLock { $0 = r } }
        #expect(inline.withLock { $0 } == .failure(.noRecords))
        #expect(log.lastLSN == LSN(1))
        #expect(try await log.append([record(2, term: 2)]) == LSN(2))
    }

    @Test("a log from another cluster is refused")
    func clusterMismatch() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        WriteAheadLog.createAndClose(dir.path)
        let other = ClusterID.random()
        #expect(throws: WALError.clusterMismatch(segment: "0000000000000001.wal", expected: other, found: testCluster)) {
            _ = try WriteAheadLog.open(directory: dir.path, clusterID: other, options: smallOptions())
        }
        #expect(throws: WALError.alreadyExists(dir.path)) {
            _ = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        }
    }

    @Test("an fsync error stops the log: that append and every later one fail")
    func fsyncFailStop() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let syncs = Counter()
        var opts = smallOptions()
        opts.fsyncFault = { _ in syncs.increment() == 3 ? EIO : nil }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: opts)
        defer { log.close() }
        try await log.append([record(1)])
        try await log.append([record(2)])
        await #expect(throws: WALError.self) { try await log.append([record(3)]) }
        #expect(log.failed != nil)
        await #expect(throws: WALError.self) { try await log.append([record(3)]) }
        await #expect(throws: WALError.self) { try await log.append([record(4)]) }
        #expect(log.lastLSN == LSN(2), "nothing after the failed fsync is reported durable")
        #expect(throws: WALError.self) { try log.truncateSuffix(after: LSN(1)) }
        #expect(syncs.value == 3, "a failed fsync is never retried")
    }

    @Test("suffix truncation at a batch boundary and inside a batch, then appends continue")
    func truncateSuffix() async throws {
        for preallocate in [true, false] {
            let dir = TempDir(); defer { dir.cleanup() }
            let opts = smallOptions(preallocate: preallocate)
            let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: opts)
            var records: [LogRecord] = []
            for b in 0..<40 {
                let batch = (1...10).map { record(UInt64(b * 10 + $0), term: UInt64(1 + b / 10), size: 100) }
                records.append(contentsOf: batch)
                try await log.append(batch)
            }
            try log.truncateSuffix(after: LSN(250))  // boundary
            #expect(log.lastLSN == LSN(250))
            try log.truncateSuffix(after: LSN(243))  // inside a batch
            #expect(log.lastLSN == LSN(243))
            #expect(log.term(at: LSN(243)) == Term(3))
            let replacement = (244...260).map { record(UInt64($0), term: 9, size: 50) }
            try await log.append(replacement)
            log.close()
            let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: opts)
            defer { again.close() }
            #expect(try readAll(again) == Array(records[0..<243]) + replacement)
            #expect(again.term(at: LSN(250)) == Term(9))
            try again.truncateSuffix(after: LSN(0))
            #expect(again.lastLSN == LSN(0))
            try await again.append([record(1, term: 10)])
            #expect(try readAll(again) == [record(1, term: 10)])
        }
    }

    @Test("batches written with O_DIRECT leave the same bytes as through the page cache, and read back the same from memory and from the disk")
    func directIO() async throws {
        var files: [Bool: [[UInt8]]] = [:]
        for direct in [true, false] {
            let dir = TempDir(); defer { dir.cleanup() }
            var opts = smallOptions()
            opts.directIO = direct
            opts.recentBatchBytes = 6 << 10  // most reads miss the kept batches
            let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: opts)
            var rng = SeededRandom(seed: 5)
            var records: [LogRecord] = []
            var lsn: UInt64 = 0
            for _ in 0..<120 {
                let batch = (0..<Int(1 + rng.next() % 6)).map { _ in
                    lsn += 1
                    return record(lsn, size: Int(rng.next() % 3000))
                }
                records.append(contentsOf: batch)
                try await log.append(batch)
                // A reader right behind the writer, as a replica applying what it logged.
                #expect(try log.read(from: batch[0].lsn, maxBytes: 1 << 20) == batch)
            }
            #expect(log.segmentCount > 3, "64 KiB segments roll")
            #expect(try readAll(log) == records)
            if direct && DirectBatchWriter.isSupported(in: dir.path) {
                #expect(log.statistics.directBatches > 100, "O_DIRECT used where the file system takes it")
            } else if direct {
                print("note: \(dir.path) refuses O_DIRECT; only the page-cache path was exercised")
            }
            if !direct { #expect(log.statistics.directBatches == 0) }
            // A cut inside a batch, new records over it, read by the same log object
            // (the kept batches and the direct writer's tail must not outlive the cut).
            try log.truncateSuffix(after: LSN(lsn - 9))
            let replacement = (lsn - 8...lsn + 20).map { record($0, term: 2, size: 700) }
            try await log.append(replacement)
            let expected = Array(records.prefix(Int(lsn - 9))) + replacement
            #expect(try readAll(log) == expected)
            log.close()
            let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: opts)
            #expect(again.recovery.tornBytesRemoved == 0)
            #expect(try readAll(again) == expected)
            // Appends after reopening: the direct writer starts from a recovered end in the
            // middle of a block.
            let later = (lsn + 21...lsn + 60).map { record($0, term: 3, size: Int(rng.next() % 2500)) }
            for r in later { try await again.append([r]) }
            #expect(try readAll(again) == expected + later)
            if direct && DirectBatchWriter.isSupported(in: dir.path) { #expect(again.statistics.directBatches == later.count) }
            again.close()
            files[direct] = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".wal") }.sorted()
                .map { fileBytes(dir.file($0)) }
        }
        #expect(files[true] == files[false], "the on-disk format does not depend on how batches are written")
    }

    @Test("a truncation that fails midway stops the log; reopened, it holds the records as they were")
    func failedTruncationStops() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        var records: [LogRecord] = []
        for b in 0..<10 {
            let batch = (1...10).map { record(UInt64(b * 10 + $0), size: 100) }
            records.append(contentsOf: batch)
            try await log.append(batch)
        }
        // A cut inside a batch rewrites the segment through "<segment>.tmp": a directory
        // there makes that rewrite fail.
        let last = try #require(try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".wal") }.sorted().last)
        try FileManager.default.createDirectory(atPath: dir.file(last + ".tmp"), withIntermediateDirectories: false)
        #expect { try log.truncateSuffix(after: LSN(95)) } throws: { error in
            if case .failed = error as? WALError { return true }
            return false
        }
        await #expect { try await log.append([record(101)]) } throws: { error in
            if case .failed = error as? WALError { return true }
            return false
        }
        log.close()
        try FileManager.default.removeItem(atPath: dir.file(last + ".tmp"))
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(try readAll(again) == records)
    }

    @Test("prefix removal honours snapshot coverage and retention; reset restarts after a snapshot")
    func prefixAndReset() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        for b in 0..<60 { try await log.append((1...10).map { record(UInt64(b * 10 + $0), size: 200) }) }
        let before = log.segmentCount
        #expect(before >= 3)
        // Retention by bytes keeps covered segments while the log is small enough.
        #expect(try log.removePrefix(through: LSN(600), retention: RetentionPolicy(maxBytes: 1 << 30, maxAgeSeconds: 3600)) == 0)
        // Age: pretend two hours passed.
        let removed = try log.removePrefix(through: LSN(300), retention: RetentionPolicy(maxBytes: 1 << 30, maxAgeSeconds: 3600),
                                           now: Date().addingTimeInterval(7200))
        #expect(removed >= 1)
        #expect(log.firstLSN <= LSN(301), "records after the snapshot are never removed")
        #expect(log.term(at: log.firstLSN.previous) == Term(1))
        #expect(throws: WALError.self) { try log.read(from: LSN(1), maxBytes: 100) }
        let tail = try readAll(log)
        #expect(tail.last?.lsn == LSN(600) && tail.first?.lsn == log.firstLSN)

        try log.reset(after: LSN(1000), term: Term(7))
        #expect(log.firstLSN == LSN(1001) && log.lastLSN == LSN(1000))
        #expect(log.term(at: LSN(1000)) == Term(7))
        try await log.append([record(1001, term: 7)])
        log.close()
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(again.firstLSN == LSN(1001) && again.lastLSN == LSN(1001))
        #expect(again.segmentCount == 1)
    }

    @Test("a crash at any step of a reset leaves a log that opens, and the reset done again completes")
    func crashDuringReset() async throws {
        struct Crash: Error {}
        // A reset point inside the log, one where a segment starts (its namesake), and one
        // before the log's first record (a restored older snapshot).
        for mode in ["inside", "namesake", "older"] {
            var step = 0
            while true {
                let dir = TempDir(); defer { dir.cleanup() }
                let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
                for b in 0..<100 { try await log.append((1...10).map { record(UInt64(b * 10 + $0), size: 200) }) }
                let starts = try WriteAheadLog.segmentNames(in: dir.path).compactMap { WALFormat.parseSegmentFileName($0) }.sorted()
                #expect(starts.count >= 4, "the test needs segments after the reset point")
                var at = mode == "namesake" ? starts[1].previous : LSN(starts[1].rawValue + 5)
                if mode == "older" {
                    _ = try log.removePrefix(through: starts[2].previous, retention: .removeAllCovered)
                    #expect(log.firstLSN == starts[2] && log.segmentCount >= 2)
                    at = LSN(starts[1].rawValue + 3)
                }
                var calls = 0
                log.crashPointInReset = { _ in
                    calls += 1
                    if calls == step + 1 { throw Crash() }
                }
                let crashed: Bool
                do {
                    try log.reset(after: at, term: Term(9))
                    crashed = false
                } catch {
                    crashed = true
                }
                log.close()
                // Reopened as after a crash at that step, then reset again, as an
                // interrupted snapshot install does on open.
                let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
                if crashed {
                    let records = try readAll(again)
                    #expect(zip(records, records.dropFirst()).allSatisfy { $0.lsn.next == $1.lsn }, "step \(step): a gap")
                    try again.reset(after: at, term: Term(9))
                }
                #expect(again.firstLSN == at.next && again.lastLSN == at && again.term(at: at) == Term(9), "step \(step)")
                try await again.append([record(at.next.rawValue, term: 9)])
                again.close()
                let last = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
                #expect(try readAll(last).map(\.lsn) == [at.next], "step \(step)")
                last.close()
                if !crashed { break }
                step += 1
            }
            #expect(step >= 3, "the reset took \(step) steps: the crash points were not all reached")
        }
    }

    @Test("a reset onto the LSN where an existing segment starts replaces that segment")
    func resetOntoNamesake() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let log = try WriteAheadLog.create(directory: dir.path, clusterID: testCluster, options: smallOptions())
        try await log.append((1...5).map { record(UInt64($0)) })
        try log.reset(after: LSN(0), term: Term(3))
        #expect(log.lastLSN == LSN(0) && log.term(at: LSN(0)) == Term(3))
        try await log.append([record(1, term: 3)])
        log.close()
        let again = try WriteAheadLog.open(directory: dir.path, clusterID: testCluster, options: smallOptions())
        defer { again.close() }
        #expect(try readAll(again) == [record(1, term: 3)])
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func increment() -> Int { lock.withLock { n += 1; return n } }
    var value: Int { lock.withLock { n } }
}

extension WriteAheadLog {
    static func createAndClose(_ path: String) {
        (try? WriteAheadLog.create(directory: path, clusterID: testCluster, options: smallOptions()))?.close()
    }
}

/// Checks that values arrive in increasing order (from any thread).
final class OrderCheck: @unchecked Sendable {
    private let lock = NSLock()
    private var last: LSN = .zero
    private var ok = true
    func saw(_ lsn: LSN) { lock.withLock { if lsn <= last { ok = false }; last = lsn } }
    var inOrder: Bool { lock.withLock { ok } }
}
