import TandemModel

/// Settings of one site's write-ahead log, with their defaults.
public struct WALOptions: Sendable {
    /// Bytes per segment file; segments are preallocated with zeros to this size so an
    /// append's fdatasync does not also have to commit a file-size change.
    public var segmentSize: Int = 64 << 20
    /// Largest payload one record may carry.
    public var maxRecordBytes: Int = 16 << 20
    /// Largest batch (one write + one fdatasync) the group commit builds.
    public var maxBatchBytes: Int = 8 << 20
    /// Bytes waiting for the writer; appends beyond this are refused (back-pressure).
    public var maxQueuedBytes: Int = 256 << 20
    /// Fill new segments with zeros before use (faster fdatasync; see docs/ARCHITECTURE.md).
    public var preallocate: Bool = true
    /// Write batches into preallocated segments with O_DIRECT, past the page cache
    /// (`DirectBatchWriter`); recent batches are kept in memory for readers instead.
    /// Ignored where the file system refuses O_DIRECT.
    public var directIO: Bool = true
    /// Bytes of the most recent batches kept in memory, so that a replica applying what it
    /// just logged, or a peer just behind, does not read them back from the disk.
    public var recentBatchBytes: Int = 16 << 20
    /// Testing seam: called before each fdatasync of a segment; an errno it returns is
    /// treated exactly as if fdatasync had failed with it.
    public var fsyncFault: (@Sendable (_ path: String) -> Int32?)? = nil
    /// Told the duration of each batch's fdatasync that succeeded (for a latency
    /// histogram); called on the writer thread, so it must return quickly.
    public var fsyncObserver: (@Sendable (_ nanoseconds: UInt64) -> Void)? = nil

    public init() {}

    /// Checks the relations between the settings.
    public func validate() throws(WALError) {
        guard segmentSize >= 4096 else { throw .invalidOptions("segmentSize must be at least 4096 bytes, got \(segmentSize)") }
        guard maxRecordBytes >= 1, maxRecordBytes <= Int(UInt32.max) - 64 else {
            throw .invalidOptions("maxRecordBytes must be between 1 and 4 GiB, got \(maxRecordBytes)")
        }
        guard maxBatchBytes >= 4096 else { throw .invalidOptions("maxBatchBytes must be at least 4096, got \(maxBatchBytes)") }
        guard maxQueuedBytes >= maxBatchBytes else {
            throw .invalidOptions("maxQueuedBytes (\(maxQueuedBytes)) must be at least maxBatchBytes (\(maxBatchBytes))")
        }
    }
}

/// How long log segments already covered by a snapshot are kept for peers that catch
/// up from the log instead of a snapshot. Segments not covered are never removed.
public struct RetentionPolicy: Sendable {
    /// Covered segments are removed, oldest first, while the log is larger than this.
    public var maxBytes: Int
    /// Covered segments last written longer ago than this are removed.
    public var maxAgeSeconds: Double

    public init(maxBytes: Int = 1 << 30, maxAgeSeconds: Double = 24 * 3600) {
        self.maxBytes = maxBytes
        self.maxAgeSeconds = maxAgeSeconds
    }

    /// Remove every covered segment.
    public static let removeAllCovered = RetentionPolicy(maxBytes: 0, maxAgeSeconds: 0)
}

/// Errors of the write-ahead log. Each names what was wrong.
public enum WALError: Error, CustomStringConvertible, Sendable, Equatable {
    /// Damage to data that had been reported durable. Nothing was truncated; rebuild
    /// this site from its peers.
    case corruption(segment: String, offset: Int, lsn: LSN, reason: String)
    case clusterMismatch(segment: String, expected: ClusterID, found: ClusterID)
    /// The log stopped after an I/O error (fail-stop): nothing after it is durable.
    case failed(String)
    case diskFull(String)
    case io(String)
    case nonContiguous(expected: LSN, got: LSN)
    case termRegression(lsn: LSN, term: Term, previous: Term)
    case recordTooLarge(size: Int, limit: Int)
    /// One append's records, headers included, exceed what one batch can frame.
    case appendTooLarge(size: Int, limit: Int)
    case queueFull(queuedBytes: Int, limit: Int)
    /// An append of no records: it has no last LSN to report.
    case noRecords
    case unavailable(requested: LSN, first: LSN, last: LSN)
    case invalidOptions(String)
    case alreadyExists(String)
    case notFound(String)
    case closed

    public var description: String {
        switch self {
        case let .corruption(segment, offset, lsn, reason):
            "log corruption in segment \(segment) at byte offset \(offset) (LSN \(lsn)): \(reason); nothing was truncated — rebuild this site from its peers"
        case let .clusterMismatch(segment, expected, found):
            "segment \(segment) belongs to cluster \(found), not \(expected)"
        case let .failed(why): "the log has stopped after an I/O error and accepts no more writes: \(why)"
        case let .diskFull(why): "disk full: \(why)"
        case let .io(why): "I/O error: \(why)"
        case let .nonContiguous(expected, got): "record LSN \(got) does not follow the log: expected \(expected)"
        case let .termRegression(lsn, term, previous): "record \(lsn) has term \(term), lower than the previous record's \(previous)"
        case let .recordTooLarge(size, limit): "record payload of \(size) bytes exceeds the limit of \(limit)"
        case let .appendTooLarge(size, limit): "an append of \(size) bytes (records and their headers) exceeds one batch's limit of \(limit)"
        case let .queueFull(queued, limit): "log write queue full: \(queued) bytes queued, limit \(limit)"
        case .noRecords: "an append must carry at least one record"
        case let .unavailable(requested, first, last): "LSN \(requested) is not in the retained log (\(first)...\(last))"
        case let .invalidOptions(why): "invalid log settings: \(why)"
        case let .alreadyExists(path): "a log already exists at \(path)"
        case let .notFound(path): "no log at \(path)"
        case .closed: "the log is closed"
        }
    }
}

/// What recovery found when the log was opened.
public struct RecoveryReport: Sendable {
    public var segments: Int = 0
    public var records: Int = 0
    public var bytesScanned: Int = 0
    /// Bytes of a torn final batch that were cut off (kept in a `.broken` file).
    public var tornBytesRemoved: Int = 0
    /// Segments made obsolete by a snapshot install and removed.
    public var obsoleteSegmentsRemoved: Int = 0
}
