import Foundation
import Glibc
import TandemModel

/// One site's durable, segmented write-ahead log.
///
/// Appends from many callers are gathered by one writer thread into batches; each batch
/// is one `pwrite` and one `fdatasync`, and an append is reported durable only after the
/// fsync covering it returned success (group commit). After an fsync error the log is
/// fail-stop. Opening the log recovers it: a torn final batch is cut off, damage to
/// anything earlier is reported as corruption and nothing is truncated.
///
/// Thread safety: all state is guarded by `lock`; blocking I/O happens on the writer
/// thread, on the caller's thread for maintenance (which first drains the writer), or on
/// the caller's thread for an inline append (`appendInline`, only when the log is idle).
/// One batch at a time is written and reported (`writing`), so completions arrive in LSN
/// order whichever thread wrote the batch.
public final class WriteAheadLog: @unchecked Sendable {
    /// Tests only: called after each file operation of `reset`; throwing stops the reset
    /// there, as a crash would (the test then reopens the directory).
    package var crashPointInReset: ((String) throws -> Void)?
    public let directory: String
    public let clusterID: ClusterID
    public let options: WALOptions

    /// A segment as known in memory. Its `fd` is shared by readers (positional I/O).
    struct Segment {
        var name: String
        var fd: FileDescriptor
        var firstLSN: LSN
        var previousTerm: Term
        var headerCRC: UInt32
        var isReset: Bool
        /// Offset just after the last durable batch.
        var end: Int
        /// Body CRC of the last batch (or the header CRC): the next batch chains to it.
        var chainCRC: UInt32
        var lastLSN: LSN
        var lastTerm: Term
        /// Offsets of batches and their first LSNs, for reads.
        var batchOffsets: [Int] = []
        var batchFirstLSNs: [UInt64] = []
        var path: String

        /// Records a batch made durable at `batch.offset`. Mutated in place in `segments`:
        /// a copy of the segment taken by the writer would make every append copy both
        /// offset arrays (copy-on-write), a cost growing with the segment's batches.
        mutating func add(_ batch: WrittenBatch) {
            batchOffsets.append(batch.offset)
            batchFirstLSNs.append(batch.firstLSN.rawValue)
            end = batch.offset + batch.byteCount
            chainCRC = batch.bodyCRC
            lastLSN = batch.lastLSN
            lastTerm = batch.lastTerm
        }
    }

    /// Where the next batch goes: the scalar state of the last segment, without its
    /// offset arrays (see `Segment.add`).
    struct TailPosition {
        var fd: FileDescriptor
        var name: String
        var path: String
        var end: Int
        var chainCRC: UInt32
        var lastTerm: Term
        var hasBatches: Bool

        init(_ s: Segment) {
            fd = s.fd
            name = s.name
            path = s.path
            end = s.end
            chainCRC = s.chainCRC
            lastTerm = s.lastTerm
            hasBatches = !s.batchOffsets.isEmpty
        }
    }

    /// A durable batch in a segment: written and fdatasynced by the writer, or found by
    /// recovery.
    struct WrittenBatch {
        var offset: Int
        var byteCount: Int
        /// The batch as written (kept among the recent batches for readers; empty when
        /// found by recovery).
        var bytes: [UInt8] = []
        /// Written with O_DIRECT.
        var direct = false
        var bodyCRC: UInt32
        var firstLSN: LSN
        var lastLSN: LSN
        var lastTerm: Term
    }

    struct Pending: Sendable {
        /// At least one record (`admissionError`).
        var records: [LogRecord]
        var bytes: Int
        var completion: @Sendable (Result<LSN, WALError>) -> Void
        /// Read from `records` once, when queued: the writer's per-batch bookkeeping then
        /// touches no record (each record read out of the array is a retain and a release
        /// of its payload).
        var lastLSN: LSN
        var firstTerm: Term
        var lastTerm: Term

        init(records: [LogRecord], bytes: Int, completion: @escaping @Sendable (Result<LSN, WALError>) -> Void) {
            self.records = records
            self.bytes = bytes
            self.completion = completion
            lastLSN = records.last?.lsn ?? .zero
            firstTerm = records.first?.term ?? .zero
            lastTerm = records.last?.term ?? .zero
        }
    }

    private let lock = NSCondition()
    private var segments: [Segment] = []
    private var pending: [Pending] = []
    /// An emptied batch's buffer, kept for the queue to reuse (see `writerLoop`).
    private var recycledPending: [Pending] = []
    private var pendingBytes = 0
    private var writing = false
    private var maintenance = false
    private var isClosed = false
    private var failure: WALError?
    /// The next LSN an append must carry (counts queued records).
    private var queuedNextLSN: LSN
    private var queuedLastTerm: Term
    /// Runs of equal term: (first LSN of the run, term), ascending. Durable records only.
    private var termRuns: [(lsn: LSN, term: Term)] = []
    private var writer: Thread?
    /// Written only by the thread that set `writing` (the writer or an inline appender), read under `lock` after publishing.
    private var lastFsyncNanoseconds: UInt64 = 0
    /// The last batch's write call, as `lastFsyncNanoseconds`.
    private var lastWriteNanoseconds: UInt64 = 0
    /// Appends in the last batch: how many the writer expects back for the next one.
    private var expectedAppends = 1
    private let writerDone = NSCondition()
    private var writerExited = false

    /// What the last open found.
    public let recovery: RecoveryReport

    /// Counters since open, for metrics and benchmarks.
    public struct Statistics: Sendable {
        public var batches = 0
        public var records = 0
        public var bytes = 0
        public var fsyncNanoseconds: UInt64 = 0
        /// Time in the batches' write calls (before their fdatasync).
        public var writeNanoseconds: UInt64 = 0
        /// Batches written on an appender's thread (`appendInline`) rather than the writer's.
        public var inlineBatches = 0
        /// Batches written with O_DIRECT (`WALOptions.directIO`).
        public var directBatches = 0
    }
    private var stats = Statistics()

    /// The live segment's direct writer; touched only by the thread that set `writing`
    /// (or a maintenance call, with the writer paused).
    private var direct: DirectBatchWriter?
    private var directRefused = false
    /// The segment and the file range a direct write is rewriting now (under
    /// `rewriteLock`, its own, so that a write never waits for a reader holding `lock`).
    /// Readers wait instead of reading that range from the disk, a precaution: a page
    /// read in the middle of a direct write could otherwise stay cached with old bytes if
    /// the kernel failed to drop it. Lock order: `lock`, then `rewriteLock`.
    private let rewriteLock = NSCondition()
    private var rewriting: (segment: String, from: Int, to: Int)?

    /// The most recent batches by segment and offset, oldest first in `recentOrder`
    /// (from `recentHead`), at most `options.recentBatchBytes` in all. Under `lock`.
    private struct BatchKey: Hashable {
        var segment: String
        var offset: Int
    }
    private var recent: [BatchKey: [UInt8]] = [:]
    private var recentOrder: [BatchKey] = []
    private var recentHead = 0
    private var recentBytes = 0

    /// Keeps a written batch for readers, dropping the oldest beyond the limit. Caller holds lock.
    private func remember(_ bytes: [UInt8], segment: String, offset: Int) {
        guard options.recentBatchBytes > 0, bytes.count <= options.recentBatchBytes else { return }
        let key = BatchKey(segment: segment, offset: offset)
        if let old = recent.updateValue(bytes, forKey: key) { recentBytes -= old.count } else { recentOrder.append(key) }
        recentBytes += bytes.count
        while recentBytes > options.recentBatchBytes, recentHead < recentOrder.count {
            if let dropped = recent.removeValue(forKey: recentOrder[recentHead]) { recentBytes -= dropped.count }
            recentHead += 1
        }
        if recentHead > 4096 && recentHead * 2 > recentOrder.count {
            recentOrder.removeFirst(recentHead)
            recentHead = 0
        }
    }

    /// Forgets the recent batches (the segments are about to change). Caller holds lock.
    private func forgetRecent() {
        recent.removeAll()
        recentOrder.removeAll()
        recentHead = 0
        recentBytes = 0
    }
    public var statistics: Statistics { lock.withLock { stats } }

    /// A zero-filled file prepared in the background for the next segment, so rolling
    /// to a new segment does not stall appends while 64 MiB of zeros are written.
    private let spareLock = NSLock()
    private var spare: FileDescriptor?
    private var preparingSpare = false
    static let spareName = "next.wal.prealloc"

    // MARK: Opening

    /// Creates an empty log in `directory` (created if missing). Refuses a directory
    /// that already holds segments: a log is never replaced by accident.
    public static func create(directory: String, clusterID: ClusterID, options: WALOptions = WALOptions()) throws -> WriteAheadLog {
        try options.validate()
        do { try Durable.makeDirectory(directory) } catch { throw WALError.io("create \(directory): \(error)") }
        if try !segmentNames(in: directory).isEmpty { throw WALError.alreadyExists(directory) }
        let seg = try createSegment(directory: directory, clusterID: clusterID, options: options,
                                    firstLSN: LSN(1), previousTerm: .zero, isReset: false)
        return WriteAheadLog(directory: directory, clusterID: clusterID, options: options, segments: [seg], termRuns: [], report: RecoveryReport())
    }

    /// Opens and recovers the log in `directory`.
    public static func open(directory: String, clusterID: ClusterID, options: WALOptions = WALOptions()) throws -> WriteAheadLog {
        try options.validate()
        var report = RecoveryReport()
        let (segs, runs) = try recover(directory: directory, clusterID: clusterID, options: options, report: &report)
        return WriteAheadLog(directory: directory, clusterID: clusterID, options: options, segments: segs, termRuns: runs, report: report)
    }

    /// Whether `directory` holds log segments.
    public static func exists(directory: String) -> Bool {
        ((try? segmentNames(in: directory)) ?? []).isEmpty == false
    }

    private init(directory: String, clusterID: ClusterID, options: WALOptions, segments: [Segment],
                 termRuns: [(lsn: LSN, term: Term)], report: RecoveryReport) {
        self.directory = directory
        self.clusterID = clusterID
        self.options = options
        self.segments = segments
        self.recovery = report
        let last = segments[segments.count - 1]
        queuedNextLSN = last.lastLSN.next
        queuedLastTerm = last.lastTerm
        self.termRuns = termRuns
        let thread = Thread { [self] in
            nameCurrentThread("wal-writer")
            self.writerLoop()
        }
        writer = thread
        thread.start()
        prepareSpare()
    }

    /// Starts preparing the spare segment file if none is ready or under way.
    private func prepareSpare() {
        guard options.preallocate else { return }
        spareLock.lock()
        if spare != nil || preparingSpare {
            spareLock.unlock()
            return
        }
        preparingSpare = true
        spareLock.unlock()
        let path = directory + "/" + Self.spareName
        let size = options.segmentSize
        let thread = Thread { [self] in
            nameCurrentThread("wal-prealloc")
            var ready: FileDescriptor?
            do {
                let fd = try FileDescriptor(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
                try Self.zeroFill(fd, from: 0, to: size)
                try fd.sync()
                ready = fd
            } catch {
                // No spare: the next roll creates its segment synchronously.
                try? Durable.unlink(path)
            }
            spareLock.lock()
            spare = ready
            preparingSpare = false
            spareLock.unlock()
        }
        thread.start()
    }

    /// Takes the prepared spare, if it is ready.
    private func takeSpare() -> FileDescriptor? {
        spareLock.lock()
        defer { spareLock.unlock() }
        let s = spare
        spare = nil
        return s
    }


    deinit {
        // close() is the orderly path; this only makes sure the thread ends.
        lock.lock()
        isClosed = true
        lock.broadcast()
        lock.unlock()
    }

    /// Stops accepting appends, finishes the queued ones, and stops the writer thread.
    public func close() {
        lock.lock()
        isClosed = true
        lock.broadcast()
        // An inline batch on another thread is written and reported before close returns.
        while writing { lock.wait() }
        lock.unlock()
        writerDone.lock()
        while !writerExited { writerDone.wait() }
        writerDone.unlock()
    }

    // MARK: State

    /// The first LSN still in the log (after prefix removal); `lastLSN + 1` when empty.
    public var firstLSN: LSN { lock.withLock { segments[0].firstLSN } }
    /// The last durable record's LSN (0 when the log never held a record).
    public var lastLSN: LSN { lock.withLock { segments[segments.count - 1].lastLSN } }
    /// The last durable record's term.
    public var lastTerm: Term { lock.withLock { segments[segments.count - 1].lastTerm } }
    /// Total bytes of the segment files' contents (not counting preallocated zeros).
    public var byteSize: Int { lock.withLock { segments.reduce(0) { $0 + $1.end } } }
    public var segmentCount: Int { lock.withLock { segments.count } }
    /// The term of every durable record, as runs: (first LSN of the run, term), ascending.
    public var termRunsSnapshot: [(lsn: LSN, term: Term)] { lock.withLock { termRuns } }
    /// The error that stopped the log, if any.
    public var failed: WALError? { lock.withLock { failure } }

    /// The term of the record at `lsn`, or of the record before the first retained one.
    /// nil when `lsn` is outside the retained log.
    public func term(at lsn: LSN) -> Term? {
        lock.withLock {
            let first = segments[0].firstLSN
            if lsn == first.previous { return segments[0].previousTerm }
            guard lsn >= first, lsn <= segments[segments.count - 1].lastLSN else { return nil }
            var result: Term?
            for run in termRuns where run.lsn <= lsn { result = run.term }
            return result
        }
    }

    // MARK: Appending

    /// Queues records for the next batch. `completion` runs on the thread that wrote the
    /// batch (the writer thread) once the records are durable (with the last LSN) or have
    /// failed. Records must follow the
    /// log: consecutive LSNs, terms that never go down.
    public func append(_ records: [LogRecord], completion: @escaping @Sendable (Result<LSN, WALError>) -> Void) {
        lock.lock()
        if let error = admissionError(records) {
            lock.unlock()
            completion(.failure(error))
            return
        }
        enqueue(records, completion: completion)
        lock.unlock()
    }

    /// Appends records and returns once they are durable, with the last LSN.
    @discardableResult
    public func append(_ records: [LogRecord]) async throws -> LSN {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<LSN, any Error>) in
            append(records) { result in c.resume(with: result.mapError { $0 as any Error }) }
        }
    }

    /// Appends one record at the next LSN (assigned here, atomically) and returns once it
    /// is durable. For single-writer use such as benchmarks and tools.
    @discardableResult
    public func append(term: Term, kind: RecordKind, payload: [UInt8]) async throws -> LSN {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<LSN, any Error>) in
            appendAssigning(term: term, kind: kind, payload: payload) { c.resume(with: $0.mapError { $0 as any Error }) }
        }
    }

    /// Appends one record at the next LSN (assigned here, atomically); `completion` runs
    /// once it is durable. For tools and benchmarks that do not number records themselves.
    public func appendAssigning(term: Term, kind: RecordKind, payload: [UInt8],
                                completion: @escaping @Sendable (Result<LSN, WALError>) -> Void) {
        lock.lock()
        let record = LogRecord(term: max(term, queuedLastTerm), lsn: queuedNextLSN, kind: kind, payload: payload)
        if let error = admissionError([record]) {
            lock.unlock()
            completion(.failure(error))
            return
        }
        enqueue([record], completion: completion)
        lock.unlock()
    }

    /// Why `records` cannot be queued now, if they cannot. Caller holds the lock.
    private func admissionError(_ records: [LogRecord]) -> WALError? {
        if isClosed { return .closed }
        if let failure { return failure }
        if records.isEmpty { return .noRecords }
        var expected = queuedNextLSN
        var term = queuedLastTerm
        var bytes = 0
        for r in records {
            guard r.lsn == expected else { return .nonContiguous(expected: expected, got: r.lsn) }
            guard r.term >= term else { return .termRegression(lsn: r.lsn, term: r.term, previous: term) }
            guard r.payload.count <= options.maxRecordBytes else {
                return .recordTooLarge(size: r.payload.count, limit: options.maxRecordBytes)
            }
            expected = expected.next
            term = r.term
            bytes += WALFormat.recordHeaderSize + r.payload.count
        }
        // A batch's body length is a u32 on disk.
        guard bytes <= Int(UInt32.max) - WALFormat.batchHeaderSize else {
            return .appendTooLarge(size: bytes, limit: Int(UInt32.max) - WALFormat.batchHeaderSize)
        }
        if !hasRoomLocked(bytes) {
            return .queueFull(queuedBytes: pendingBytes, limit: options.maxQueuedBytes)
        }
        return nil
    }

    /// Bytes `records` take in a batch (headers included).
    private static func byteCount(_ records: [LogRecord]) -> Int {
        records.reduce(0) { $0 + WALFormat.recordHeaderSize + $1.payload.count }
    }

    /// Numbers the next append after `records`. Caller holds the lock.
    private func advanceQueuedEnd(past records: [LogRecord]) {
        if let last = records.last {
            queuedNextLSN = last.lsn.next
            queuedLastTerm = last.term
        }
    }

    private func enqueue(_ records: [LogRecord], completion: @escaping @Sendable (Result<LSN, WALError>) -> Void) {
        let bytes = Self.byteCount(records)
        advanceQueuedEnd(past: records)
        pending.append(Pending(records: records, bytes: bytes, completion: completion))
        pendingBytes += bytes
        // Wake the writer when work appears and when the expected group is complete; a
        // broadcast, since maintenance callers wait on the same condition.
        if pending.count == 1 || pending.count == expectedAppends { lock.broadcast() }
    }

    // MARK: The writer thread

    private func writerLoop() {
        while true {
            lock.lock()
            // `writing` also covers an inline batch (appendInline) on another thread.
            while (pending.isEmpty || maintenance || writing) && !(isClosed && pending.isEmpty) {
                lock.wait()
            }
            // Group commit: the appenders released by the previous batch usually append
            // again at once; wait a fraction of an fsync for them, so they share the next
            // one instead of starting a batch each (like PostgreSQL's commit_delay, but
            // only when the previous batch shows that company is coming).
            if pending.count < expectedAppends && !isClosed && !maintenance {
                let wait = min(Double(lastFsyncNanoseconds) / 2e9, 0.001)
                let deadline = Date(timeIntervalSinceNow: wait)
                while pending.count < expectedAppends && pendingBytes < options.maxBatchBytes && !isClosed {
                    if !lock.wait(until: deadline) { break }
                }
            }
            if pending.isEmpty {
                lock.unlock()
                break
            }
            // Take as many queued appends as fit in one batch (at least one), in one move:
            // removing them one at a time shifted the rest each time.
            var count = 0
            var bytes = 0
            for p in pending {
                guard count == 0 || bytes + p.bytes <= options.maxBatchBytes else { break }
                count += 1
                bytes += p.bytes
            }
            var taken: [Pending]
            if count == pending.count {
                // The usual case: the whole queue goes, and a buffer the writer emptied
                // earlier takes its place, so no append is copied and the queue keeps its
                // capacity.
                taken = pending
                pending = recycledPending
                recycledPending = []
            } else {
                taken = Array(pending[..<count])
                pending.removeFirst(count)
            }
            pendingBytes -= bytes
            expectedAppends = taken.count
            writing = true
            let stopped = failure
            let tail = TailPosition(segments[segments.count - 1])
            lock.unlock()
            runBatch(&taken, stopped: stopped, tail: tail)
        }
        writerDone.lock()
        writerExited = true
        writerDone.broadcast()
        writerDone.unlock()
    }

    /// An inline append (`appendInline`) is taken only while the last fdatasync took at
    /// most this long.
    static let inlineFsyncLimitNanoseconds: UInt64 = 5_000_000

    /// A batch buffer larger than this (a burst of appends) is let go rather than kept.
    static let recycledPendingCapacity = 4096

    /// Whether the append queue has room for `records` now (it refuses them with
    /// `queueFull` otherwise). Room only grows until the caller's next append, when it is
    /// the log's only appender.
    public func hasRoom(for records: [LogRecord]) -> Bool {
        let bytes = Self.byteCount(records)
        lock.lock()
        defer { lock.unlock() }
        return hasRoomLocked(bytes)
    }

    /// The queue takes `bytes` more when it is empty or they fit. Caller holds the lock.
    private func hasRoomLocked(_ bytes: Int) -> Bool {
        pendingBytes == 0 || pendingBytes + bytes <= options.maxQueuedBytes
    }

    /// Appends on the calling thread when the log is idle (nothing queued, no batch being
    /// written): the records are written and fdatasynced here and `completion` runs here
    /// before this returns, saving the hand-off to the writer thread and back (two
    /// wake-ups, a large share of a replica's acknowledgement time on a busy machine).
    /// When the log is busy, the records are queued for the writer as `append` does, and
    /// `completion` runs on the writer thread. The same durability rules hold either way.
    public func appendInline(_ records: [LogRecord], completion: @escaping @Sendable (Result<LSN, WALError>) -> Void) {
        lock.lock()
        if let error = admissionError(records) {
            lock.unlock()
            completion(.failure(error))
            return
        }
        let bytes = Self.byteCount(records)
        // The writer takes the batch instead when one is in flight or queued, when it would
        // roll the segment (creating one may zero-fill 64 MiB), or when the disk is slow
        // now (the caller, the site's loop, must keep answering heartbeats).
        let rolls = segments[segments.count - 1].end + WALFormat.batchHeaderSize + bytes > options.segmentSize
        guard pending.isEmpty, !writing, !maintenance, failure == nil, !rolls,
              lastFsyncNanoseconds <= Self.inlineFsyncLimitNanoseconds else {
            enqueue(records, completion: completion)
            lock.unlock()
            return
        }
        stats.inlineBatches += 1
        advanceQueuedEnd(past: records)
        writing = true
        let tail = TailPosition(segments[segments.count - 1])
        lock.unlock()
        var one = [Pending(records: records, bytes: bytes, completion: completion)]
        runBatch(&one, stopped: nil, tail: tail)
    }

    /// Writes one batch (the caller set `writing` under the lock and released it), then
    /// publishes the result and runs the completions on this thread.
    /// `taken` is left empty, its buffer passed to the queue for reuse when it is worth it.
    private func runBatch(_ taken: inout [Pending], stopped: WALError?, tail: TailPosition) {
        var result: Result<LSN, WALError>
        var written: (batch: WrittenBatch, fresh: Segment?)?
        if let stopped {
            result = .failure(stopped)
        } else {
            do {
                let batch = try writeBatch(taken, at: tail)
                written = batch
                result = .success(batch.batch.lastLSN)
            } catch let error as WALError {
                result = .failure(error)
            } catch {
                result = .failure(.io("\(error)"))
            }
        }

        lock.lock()
        var renumbered: [Pending] = []
        switch result {
        case .success:
            if let written {
                if var fresh = written.fresh {
                    // The old segment already holds its final state.
                    fresh.add(written.batch)
                    segments.append(fresh)
                } else {
                    segments[segments.count - 1].add(written.batch)
                }
            }
            stats.batches += 1
            if let written {
                if written.batch.direct { stats.directBatches += 1 }
                remember(written.batch.bytes, segment: segments[segments.count - 1].name, offset: written.batch.offset)
            }
            stats.fsyncNanoseconds += lastFsyncNanoseconds
            stats.writeNanoseconds += lastWriteNanoseconds
            options.fsyncObserver?(lastFsyncNanoseconds)
            stats.bytes += WALFormat.batchHeaderSize
            for p in taken {
                stats.records += p.records.count
                stats.bytes += p.bytes
                // Terms never go down: an append within the last run adds nothing.
                if p.firstTerm == p.lastTerm && termRuns.last?.term == p.lastTerm { continue }
                for r in p.records where termRuns.last?.term != r.term {
                    termRuns.append((r.lsn, r.term))
                }
            }
        case .failure(let error):
            switch error {
            case .diskFull:
                // Nothing reached the live segment: later appends may still succeed,
                // but the queued ones were numbered after the failed ones.
                renumbered = failQueuedAfterGap(error)
            default:
                if failure == nil { failure = error.asFailStop }
            }
        }
        let queuedFailure = failure ?? (renumbered.isEmpty ? nil : result.failureValue)
        let toFail = failure != nil ? pending : renumbered
        if queuedFailure != nil {
            pending.removeAll()
            pendingBytes = 0
        }
        lock.unlock()

        // Completions run on the thread that wrote the batch: measured faster than handing
        // them to another thread (one wake-up less per batch), and an appender that appends
        // again from its completion lands in the very next batch. They must be cheap and
        // must not block.
        for p in taken {
            // Each appender learns the last LSN of its own records.
            p.completion(result.map { _ in p.lastLSN })
        }
        if let queuedFailure { for p in toFail { p.completion(.failure(queuedFailure)) } }
        // The completions are released here, outside the lock; the buffer (the caller's
        // only reference, so emptied in place) goes back to the queue.
        taken.removeAll(keepingCapacity: true)
        // Only now may another batch start: completions are reported in LSN order.
        lock.lock()
        if taken.capacity > recycledPending.capacity && taken.capacity <= Self.recycledPendingCapacity {
            swap(&recycledPending, &taken)
        }
        writing = false
        lock.broadcast()
        lock.unlock()
    }

    /// After a batch failed without touching the log, every queued append behind it has
    /// the wrong LSNs: fail them too and renumber from the durable end. Caller holds lock.
    private func failQueuedAfterGap(_ error: WALError) -> [Pending] {
        let queued = pending
        pending.removeAll()
        pendingBytes = 0
        let last = segments[segments.count - 1]
        queuedNextLSN = last.lastLSN.next
        queuedLastTerm = last.lastTerm
        return queued
    }

    /// Writes and fdatasyncs one batch at `tail`, or at the start of a new segment (returned
    /// as `fresh`) when it does not fit. The caller publishes it in `segments`.
    private func writeBatch(_ taken: [Pending], at tail: TailPosition) throws -> (batch: WrittenBatch, fresh: Segment?) {
        // Every append holds at least one record (`admissionError`).
        guard let first = taken.first?.records.first, let last = taken.last?.records.last else { throw WALError.noRecords }
        var recordCount = 0, bodyBytes = 0
        for p in taken {
            recordCount += p.records.count
            bodyBytes += p.bytes
        }
        // The appends' records in order, stored from their own arrays.
        func encode(chainedTo previousCRC: UInt32) -> (bytes: [UInt8], bodyCRC: UInt32) {
            WALFormat.encodeBatch(recordCount: recordCount, bodyBytes: bodyBytes, firstLSN: first.lsn, previousCRC: previousCRC) { buf, offset in
                taken.withUnsafeBufferPointer { appends in
                    for a in appends.indices {
                        // Read in place: iterating the arrays copied each record out.
                        appends[a].records.withUnsafeBufferPointer { records in
                            for i in records.indices { WALFormat.storeRecord(records[i], into: buf, at: &offset) }
                        }
                    }
                }
            }
        }
        var fresh: Segment?
        var target = tail
        var batch = encode(chainedTo: tail.chainCRC)
        if tail.end + batch.bytes.count > options.segmentSize && tail.hasBatches {
            let segment: Segment
            do {
                segment = try Self.createSegment(directory: directory, clusterID: clusterID, options: options,
                                                 firstLSN: first.lsn, previousTerm: tail.lastTerm,
                                                 isReset: false, spare: takeSpare())
            } catch let e as SystemError where e.isDiskFull {
                throw WALError.diskFull("creating a new log segment: \(e)")
            }
            prepareSpare()
            fresh = segment
            target = TailPosition(segment)
            batch = encode(chainedTo: target.chainCRC)
        }
        var wroteDirect = false
        do {
            let w = monotonicNanoseconds()
            wroteDirect = try writeDirect(batch.bytes, at: target)
            if !wroteDirect { try target.fd.write(batch.bytes, at: target.end) }
            if let code = options.fsyncFault?(target.path) { throw SystemError("fdatasync", path: target.path, code: code) }
            let t = monotonicNanoseconds()
            lastWriteNanoseconds = t - w
            try target.fd.syncData()
            lastFsyncNanoseconds = monotonicNanoseconds() - t
        } catch {
            // Whatever reached the file is not durable and never will be reported so.
            direct = nil
            throw WALError.failed("\(error)")
        }
        return (WrittenBatch(offset: target.end, byteCount: batch.bytes.count, bytes: batch.bytes, direct: wroteDirect, bodyCRC: batch.bodyCRC,
                             firstLSN: first.lsn, lastLSN: last.lsn, lastTerm: last.term), fresh)
    }

    /// Writes a batch at `target`'s end with O_DIRECT when the segment allows it; false
    /// when the caller must write it through the page cache.
    private func writeDirect(_ bytes: [UInt8], at target: TailPosition) throws -> Bool {
        guard options.directIO && options.preallocate && !directRefused else { return false }
        if let d = direct, d.segment !== target.fd || d.end != target.end { direct = nil }
        if direct == nil {
            // Nothing is written yet: any failure to set up (a file system that refuses
            // O_DIRECT, out of descriptors, another file under the name) means this batch
            // goes through the page cache.
            do {
                guard let d = try DirectBatchWriter(segment: target.fd, path: target.path, end: target.end) else {
                    directRefused = true
                    return false
                }
                direct = d
            } catch {
                return false
            }
        }
        guard let d = direct else { return false }
        let range = d.range(forAppending: bytes.count)
        rewriteLock.withLock { rewriting = (target.name, range.lowerBound, range.upperBound) }
        defer {
            rewriteLock.lock()
            rewriting = nil
            rewriteLock.broadcast()
            rewriteLock.unlock()
        }
        do {
            guard try d.write(bytes) else {
                // Past the preallocation: through the page cache, and a fresh writer next time.
                direct = nil
                return false
            }
        } catch DirectBatchWriter.Refusal.alignment {
            // EINVAL before a byte was written: the device wants another alignment.
            direct = nil
            directRefused = true
            return false
        }
        return true
    }

    // MARK: Reading

    /// Reads durable records from `from` on, stopping once `maxBytes` of payload and
    /// headers have been gathered (always at least one record when one exists). Every
    /// record's checksum is verified.
    public func read(from: LSN, maxBytes: Int) throws -> [LogRecord] {
        lock.lock()
        defer { lock.unlock() }
        let first = segments[0].firstLSN
        let last = segments[segments.count - 1].lastLSN
        guard from >= first, from <= last.next else { throw WALError.unavailable(requested: from, first: first, last: last) }
        var out: [LogRecord] = []
        var bytes = 0
        var lsn = from
        guard var si = segments.lastIndex(where: { $0.firstLSN <= lsn }) else { return [] }
        while si < segments.count, lsn <= last {
            let seg = segments[si]
            if seg.lastLSN < lsn { si += 1; continue }
            // The batch holding `lsn`: the last with first LSN <= lsn.
            var lo = 0, hi = seg.batchFirstLSNs.count - 1
            while lo < hi {
                let mid = (lo + hi + 1) / 2
                if seg.batchFirstLSNs[mid] <= lsn.rawValue { lo = mid } else { hi = mid - 1 }
            }
            var bi = lo
            while bi < seg.batchOffsets.count {
                let start = seg.batchOffsets[bi]
                let end = bi + 1 < seg.batchOffsets.count ? seg.batchOffsets[bi + 1] : seg.end
                var records = Self.decodeBatch(try readChecked(seg, offset: start, length: end - start), from: lsn)
                if records == nil && options.directIO {
                    // A page read from the disk while a direct write rewrote it may linger
                    // in the page cache with the old bytes: drop it and read once more
                    // before calling this corruption.
                    _ = posix_fadvise(seg.fd.fd, off_t(start), off_t(end - start), Int32(POSIX_FADV_DONTNEED))
                    records = Self.decodeBatch(try readChecked(seg, offset: start, length: end - start, fromDisk: true), from: lsn)
                }
                guard let records else {
                    throw WALError.corruption(segment: seg.name, offset: start, lsn: lsn, reason: "record checksum mismatch on read")
                }
                for rec in records {
                    out.append(rec)
                    bytes += WALFormat.recordHeaderSize + rec.payload.count
                    lsn = rec.lsn.next
                    if bytes >= maxBytes { return out }
                }
                bi += 1
            }
            si += 1
        }
        return out
    }

    /// The records of a batch (its bytes from the batch header on) from LSN `from` on,
    /// each checksum verified; nil when one does not verify.
    private static func decodeBatch(_ raw: [UInt8], from: LSN) -> [LogRecord]? {
        raw.withUnsafeBytes { buf in
            var out: [LogRecord] = []
            var off = WALFormat.batchHeaderSize
            while off < buf.count {
                guard let (rec, next) = WALFormat.decodeRecord(buf, at: off, end: buf.count, verify: true) else { return nil }
                off = next
                if rec.lsn >= from { out.append(rec) }
            }
            return out
        }
    }

    private func readChecked(_ seg: Segment, offset: Int, length: Int, fromDisk: Bool = false) throws -> [UInt8] {
        if !fromDisk, let kept = recent[BatchKey(segment: seg.name, offset: offset)], kept.count == length { return kept }
        rewriteLock.withLock {
            while let r = rewriting, r.segment == seg.name, offset < r.to, offset + length > r.from { rewriteLock.wait() }
        }
        let raw: [UInt8]
        do { raw = try seg.fd.read(count: length, at: offset) } catch { throw WALError.io("\(error)") }
        guard raw.count == length else {
            throw WALError.corruption(segment: seg.name, offset: offset, lsn: .zero, reason: "segment shorter than its index")
        }
        return raw
    }

    // MARK: Maintenance: suffix truncation, prefix removal, reset

    /// Runs `body` with the writer drained and paused.
    private func withWriterPaused<T>(_ body: () throws -> T) throws -> T {
        lock.lock()
        while maintenance || writing || !pending.isEmpty {
            if failure != nil && !writing { break }
            lock.wait()
        }
        if isClosed { lock.unlock(); throw WALError.closed }
        maintenance = true
        // Segments may be cut, rewritten (a new file under the same name) or removed.
        forgetRecent()
        direct = nil
        lock.unlock()
        defer {
            lock.lock()
            maintenance = false
            lock.broadcast()
            lock.unlock()
        }
        do {
            return try body()
        } catch let error as WALError {
            // An I/O error midway, or a segment unreadable after the change, leaves the files
            // and what this object knows of them apart: the log stops, as after a failed
            // fdatasync, instead of appending at a position it no longer knows to be right.
            switch error {
            case .failed, .corruption:
                lock.withLock { if failure == nil { failure = error.asFailStop } }
            default:
                break
            }
            throw error
        }
    }

    /// Removes every record after `lsn`, crash-safely: after a crash the log holds either
    /// the old records or none after `lsn`, never a gap. Used by a deposed primary to drop
    /// its unreplicated tail and by a follower whose log diverged.
    public func truncateSuffix(after lsn: LSN) throws {
        try withWriterPaused {
            if let failure = self.failed { throw failure }
            var segs = lock.withLock { segments }
            guard lsn < segs[segs.count - 1].lastLSN else { return }
            guard lsn >= segs[0].firstLSN.previous else {
                throw WALError.unavailable(requested: lsn, first: segs[0].firstLSN, last: segs[segs.count - 1].lastLSN)
            }
            // Whole segments after the cut go first, newest first, so a crash midway
            // leaves a contiguous prefix.
            while segs.count > 1, segs[segs.count - 1].firstLSN > lsn {
                let s = segs.removeLast()
                try unlinkLogged(s.path)
            }
            try syncDirectory()
            var s = segs[segs.count - 1]
            if s.lastLSN > lsn {
                let bi = s.batchFirstLSNs.lastIndex(where: { $0 <= lsn.next.rawValue }) ?? 0
                let batchStart = s.batchOffsets.isEmpty ? WALFormat.segmentHeaderSize : s.batchOffsets[bi]
                if s.batchFirstLSNs.isEmpty || s.batchFirstLSNs[bi] == lsn.next.rawValue {
                    try cutSegment(&s, at: batchStart, keepingBatches: bi)
                } else {
                    try rewriteSegment(&s, batchIndex: bi, keepThrough: lsn)
                }
            }
            segs[segs.count - 1] = s
            lock.withLock {
                segments = segs
                queuedNextLSN = s.lastLSN.next
                queuedLastTerm = s.lastTerm
                while let last = termRuns.last, last.lsn > lsn { termRuns.removeLast() }
            }
        }
    }

    /// Cuts a segment at a batch boundary with ftruncate (atomic), then refills the
    /// preallocation with zeros.
    private func cutSegment(_ s: inout Segment, at offset: Int, keepingBatches count: Int) throws {
        do {
            try s.fd.truncate(to: offset)
            try s.fd.sync()
            if options.preallocate { try Self.zeroFill(s.fd, from: offset, to: options.segmentSize) }
        } catch { throw WALError.failed("truncating \(s.path): \(error)") }
        s.batchOffsets.removeSubrange(count...)
        s.batchFirstLSNs.removeSubrange(count...)
        s.end = offset
        try recomputeTail(&s)
    }

    /// Rewrites a segment whose cut falls inside a batch: the prefix and the kept part of
    /// that batch go to a temporary file, which replaces the segment by rename.
    private func rewriteSegment(_ s: inout Segment, batchIndex bi: Int, keepThrough lsn: LSN) throws {
        let batchStart = s.batchOffsets[bi]
        let batchEnd = bi + 1 < s.batchOffsets.count ? s.batchOffsets[bi + 1] : s.end
        let raw = try readChecked(s, offset: batchStart, length: batchEnd - batchStart, fromDisk: true)
        var kept: [LogRecord] = []
        raw.withUnsafeBytes { buf in
            var off = WALFormat.batchHeaderSize
            while off < buf.count, let (r, next) = WALFormat.decodeRecord(buf, at: off, end: buf.count, verify: true) {
                if r.lsn <= lsn { kept.append(r) }
                off = next
            }
        }
        let prefix = try readChecked(s, offset: 0, length: batchStart, fromDisk: true)
        let previousCRC = bi == 0 ? s.headerCRC : Self.bodyCRC(ofBatchAt: s.batchOffsets[bi - 1], in: s)
        let batch = WALFormat.encodeBatch(kept[...], previousCRC: previousCRC)
        let tmp = s.path + ".tmp"
        do {
            let fd = try FileDescriptor(path: tmp, flags: O_RDWR | O_CREAT | O_TRUNC)
            try fd.write(prefix, at: 0)
            try fd.write(batch.bytes, at: batchStart)
            if options.preallocate { try Self.zeroFill(fd, from: batchStart + batch.bytes.count, to: options.segmentSize) }
            try fd.sync()
            try Durable.rename(tmp, to: s.path)
            try syncDirectory()
            s.fd = fd
        } catch { throw WALError.failed("rewriting \(s.path): \(error)") }
        s.batchOffsets.removeSubrange((bi + 1)...)
        s.batchFirstLSNs.removeSubrange((bi + 1)...)
        s.end = batchStart + batch.bytes.count
        try recomputeTail(&s)
    }

    private static func bodyCRC(ofBatchAt offset: Int, in s: Segment) -> UInt32 {
        guard let h = try? s.fd.read(count: WALFormat.batchHeaderSize, at: offset), h.count == WALFormat.batchHeaderSize else { return 0 }
        return h.withUnsafeBytes { WALFormat.decodeBatchHeader($0, at: 0)?.bodyCRC ?? 0 }
    }

    /// Re-derives a segment's chain CRC, last LSN and last term from its last batch.
    private func recomputeTail(_ s: inout Segment) throws {
        guard let lastOffset = s.batchOffsets.last else {
            s.chainCRC = s.headerCRC
            s.lastLSN = s.firstLSN.previous
            s.lastTerm = s.previousTerm
            return
        }
        let raw = try readChecked(s, offset: lastOffset, length: s.end - lastOffset, fromDisk: true)
        var lastRecord: LogRecord?
        let header: WALFormat.BatchHeader? = raw.withUnsafeBytes { buf in
            var off = WALFormat.batchHeaderSize
            while off < buf.count, let (r, next) = WALFormat.decodeRecord(buf, at: off, end: buf.count, verify: false) {
                lastRecord = r
                off = next
            }
            return WALFormat.decodeBatchHeader(buf, at: 0)
        }
        guard let header, let lastRecord else {
            throw WALError.corruption(segment: s.name, offset: lastOffset, lsn: .zero, reason: "unreadable batch after truncation")
        }
        s.chainCRC = header.bodyCRC
        s.lastLSN = lastRecord.lsn
        s.lastTerm = lastRecord.term
    }

    /// Removes whole segments whose records are all at or before `lsn` (covered by a
    /// snapshot), oldest first, as `retention` allows. The active segment always stays.
    /// Returns the number of segments removed.
    @discardableResult
    public func removePrefix(through lsn: LSN, retention: RetentionPolicy, now: Date = Date()) throws -> Int {
        try withWriterPaused {
            var segs = lock.withLock { segments }
            var total = segs.reduce(0) { $0 + $1.end }
            var removed = 0
            while segs.count > 1, segs[0].lastLSN <= lsn {
                let age = now.timeIntervalSince(Self.modificationDate(segs[0].path) ?? now)
                guard total > retention.maxBytes || age > retention.maxAgeSeconds else { break }
                try unlinkLogged(segs[0].path)
                total -= segs[0].end
                segs.removeFirst()
                removed += 1
            }
            if removed > 0 { try syncDirectory() }
            lock.withLock {
                segments = segs
                let first = segs[0].firstLSN
                while termRuns.count > 1, termRuns[1].lsn <= first { termRuns.removeFirst() }
            }
            return removed
        }
    }

    /// Replaces the whole log by an empty one that continues after `lsn` (whose record had
    /// `term`): used when a snapshot at `lsn` has been installed. Crash-safe: the new
    /// segment is marked as a reset, and recovery drops every segment before it.
    public func reset(after lsn: LSN, term: Term) throws {
        try withWriterPaused {
            var old = lock.withLock { segments }
            let fresh: Segment
            do {
                let tmpDir = directory
                // Segments that start after the reset's first LSN go first, newest first: a
                // crash then leaves a shorter log that still reads (the install that called
                // this resets it again), never a reset segment followed by a stale one,
                // which recovery would have to call a gap.
                // The first segment stays (moved aside below when it too starts after the
                // point): a crash must never leave no segment at all.
                for s in old.dropFirst().reversed() where s.firstLSN > lsn.next {
                    try Durable.unlink(s.path)
                    try Durable.syncDirectory(tmpDir)
                    try crashPointInReset?("removed \(s.name)")
                }
                old = Array(old.prefix(1)) + old.dropFirst().filter { $0.firstLSN <= lsn.next }
                if old.contains(where: { $0.firstLSN >= lsn.next }) {
                    // The same file name as the reset segment, or (restoring an older
                    // snapshot) a first segment that starts after it: moved aside first.
                    // Without a reset segment after it, recovery puts it back.
                    for s in old where s.firstLSN >= lsn.next { try Durable.rename(s.path, to: s.path + ".obsolete") }
                    try Durable.syncDirectory(tmpDir)
                    try crashPointInReset?("moved the namesake aside")
                }
                fresh = try Self.createSegment(directory: directory, clusterID: clusterID, options: options,
                                               firstLSN: lsn.next, previousTerm: term, isReset: true)
                try crashPointInReset?("created the reset segment")
            } catch let e as WALError { throw e } catch { throw WALError.failed("reset: \(error)") }
            for s in old {
                // A namesake of the new segment was moved aside above; only that copy goes.
                if s.firstLSN != lsn.next { try unlinkLogged(s.path) }
                try unlinkLogged(s.path + ".obsolete")
                try crashPointInReset?("removed \(s.name)")
            }
            try syncDirectory()
            lock.withLock {
                segments = [fresh]
                queuedNextLSN = lsn.next
                queuedLastTerm = term
                termRuns = []
            }
        }
    }

    private func unlinkLogged(_ path: String) throws {
        do { try Durable.unlink(path) } catch { throw WALError.io("\(error)") }
    }

    private func syncDirectory() throws {
        do { try Durable.syncDirectory(directory) } catch { throw WALError.failed("\(error)") }
    }

    static func modificationDate(_ path: String) -> Date? {
        (try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date
    }

    // MARK: Segment files

    static func segmentNames(in directory: String) throws -> [String] {
        guard FileManager.default.fileExists(atPath: directory) else { return [] }
        do {
            return try FileManager.default.contentsOfDirectory(atPath: directory)
                .filter { WALFormat.parseSegmentFileName($0) != nil }
                .sorted()
        } catch { throw WALError.io("listing \(directory): \(error)") }
    }

    /// Creates a segment crash-safely: header and preallocation go to a temporary file
    /// that is fsynced and renamed into place, then the directory is fsynced.
    static func createSegment(directory: String, clusterID: ClusterID, options: WALOptions,
                              firstLSN: LSN, previousTerm: Term, isReset: Bool, spare: FileDescriptor? = nil) throws -> Segment {
        let name = WALFormat.segmentFileName(firstLSN: firstLSN)
        let path = directory + "/" + name
        // A prepared spare is already zero-filled and synced: only its header is written.
        let tmp = spare?.path ?? path + ".tmp"
        var header = WALFormat.SegmentHeader(clusterID: clusterID, firstLSN: firstLSN, previousTerm: previousTerm)
        header.isReset = isReset
        let (bytes, crc) = WALFormat.encodeSegmentHeader(header)
        let fd = try spare ?? FileDescriptor(path: tmp, flags: O_RDWR | O_CREAT | O_TRUNC)
        do {
            try fd.write(bytes, at: 0)
            if options.preallocate && spare == nil { try zeroFill(fd, from: bytes.count, to: options.segmentSize) }
            if spare != nil { try fd.syncData() } else { try fd.sync() }
            try Durable.rename(tmp, to: path)
            try Durable.syncDirectory(directory)
        } catch {
            try? Durable.unlink(tmp)
            throw error
        }
        return Segment(name: name, fd: fd, firstLSN: firstLSN, previousTerm: previousTerm, headerCRC: crc,
                       isReset: isReset, end: WALFormat.segmentHeaderSize, chainCRC: crc,
                       lastLSN: firstLSN.previous, lastTerm: previousTerm, path: path)
    }

    /// Writes real zeros (not a sparse hole): overwriting written blocks lets fdatasync
    /// skip the metadata journal commit that extending a file or unwritten extents need.
    static func zeroFill(_ fd: FileDescriptor, from start: Int, to end: Int) throws {
        guard end > start else { return }
        let chunk = [UInt8](repeating: 0, count: 1 << 20)
        var off = start
        while off < end {
            let n = min(chunk.count, end - off)
            try chunk.withUnsafeBytes { try fd.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: off) }
            off += n
        }
    }
}

extension WALError {
    /// Any error from the live segment stops the log.
    var asFailStop: WALError {
        switch self {
        case .failed: self
        default: .failed(description)
        }
    }
}

extension WriteAheadLog {
    /// Offsets of the batches of the last segment (crash tests use them to aim damage).
    public var batchOffsetsForTesting: [Int] { lock.withLock { segments[segments.count - 1].batchOffsets } }
}

extension Result {
    var failureValue: Failure? {
        if case let .failure(e) = self { return e }
        return nil
    }
}
