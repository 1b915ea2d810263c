import TandemModel

/// Limits on what one write or query may carry. Defaults suit the telehealth workload
/// (documents up to 16 MiB).
public struct StoreLimits: Sendable {
    /// Statements in one batch.
    public var maxStatements = 256
    /// UTF-8 bytes of one statement's SQL text.
    public var maxStatementBytes = 100_000
    /// Bytes of one bound value, or one string or blob SQLite builds.
    public var maxValueBytes = 16 << 20
    /// Parameters of one statement.
    public var maxParameters = 999
    /// Bytes of the changeset (or schema record) one batch produces.
    public var maxChangesetBytes = 32 << 20
    /// Rows one statement or query may return.
    public var maxRows = 100_000
    /// Bytes of rows one statement or query may return.
    public var maxResultBytes = 64 << 20
    /// Running time of one client write, all its statements together, or of one query
    /// (0: unlimited). They run on the site's loop, which also sends heartbeats: a long one
    /// would stall replication, and on a primary could cost it its lease. (A limit per
    /// statement let a write of 256 statements hold the loop for 256 times as long.)
    /// Committed records replayed from the log, and the configured schema migrations
    /// (`schemaVersion` > 0, the operator's, never a client's), are never interrupted.
    /// A running site caps it at a sixth of its lease (`SiteRuntime.loopBounded`).
    public var maxWriteNanoseconds: UInt64 = 500_000_000
    /// Running time after which a group of writes executed together starts no further
    /// write (0: unlimited); the caller offers the rest again. A running site sets it to a
    /// thirtieth of its lease, so its loop gets back to the acknowledgements in time.
    public var maxGroupNanoseconds: UInt64 = 0

    public init() {}
}

/// The outcome of one statement of a batch.
public struct StatementResult: Sendable, Hashable {
    public var rowsAffected: Int64
    public var lastInsertRowID: Int64
    public var columns: [String]
    public var rows: [[SQLValue]]
}

/// A batch executed on the primary: the log record it produced and each statement's result.
public struct Execution: Sendable {
    public var record: LogRecord
    public var results: [StatementResult]
}

/// Rows read from a site, with the LSN they reflect.
public struct QueryResult: Sendable, Hashable {
    public var columns: [String]
    public var rows: [[SQLValue]]
    public var appliedLSN: LSN
}

/// Errors of the state store. `code` is a stable, machine-readable name.
public enum StoreError: Error, CustomStringConvertible, Sendable, Equatable {
    /// SQLite refused a statement: its own message and codes, and which statement.
    case sqlite(SQLiteError, statement: Int?)
    /// Tandem refused a statement before SQLite ran it, and why.
    case refused(String, statement: Int?)
    case tooLarge(what: String, size: Int, limit: Int)
    case noPrimaryKey(table: String)
    /// Applying a committed record met a row that does not match: this site diverged.
    case conflict(lsn: LSN, table: String, reason: String)
    case outOfOrder(expected: LSN, got: LSN)
    /// The database cannot be brought to the asked LSN in place; restore a snapshot and
    /// replay the committed log.
    case needsRebuild(String)
    case badRecord(lsn: LSN, reason: String)
    case clusterMismatch(expected: ClusterID, found: String)
    case notFound(String)
    case alreadyExists(String)
    case io(String)
    case snapshot(String)
    /// A statement marked `requireChanges` changed no row: the batch was not applied.
    case preconditionFailed(statement: Int)
    /// A client statement ran longer than allowed and was interrupted (nothing applied).
    case statementTimedOut(statement: Int, limitMilliseconds: Int)

    public var code: String {
        switch self {
        case let .sqlite(e, _):
            switch e.code & 0xFF {
            case 19: "constraint"  // SQLITE_CONSTRAINT
            case 18: "too_large"  // SQLITE_TOOBIG
            case 13: "disk_full"  // SQLITE_FULL
            case 23: "refused"  // SQLITE_AUTH
            default: "sql_error"
            }
        case .refused: "refused"
        case .tooLarge: "too_large"
        case .noPrimaryKey: "no_primary_key"
        case .conflict: "divergence"
        case .outOfOrder: "out_of_order"
        case .needsRebuild: "needs_rebuild"
        case .badRecord: "bad_record"
        case .clusterMismatch: "cluster_mismatch"
        case .notFound: "not_found"
        case .alreadyExists: "already_exists"
        case .io: "io_error"
        case .snapshot: "bad_snapshot"
        case .preconditionFailed: "precondition_failed"
        case .statementTimedOut: "statement_timeout"
        }
    }

    public var description: String {
        func at(_ i: Int?) -> String { i.map { "statement \($0 + 1): " } ?? "" }
        switch self {
        case let .sqlite(e, i): return at(i) + e.description
        case let .refused(why, i): return at(i) + why
        case let .tooLarge(what, size, limit): return "\(what) of \(size) bytes exceeds the limit of \(limit)"
        case let .noPrimaryKey(t):
            return "table \(t) has no PRIMARY KEY: Tandem replicates rows by primary key; declare one"
        case let .conflict(lsn, table, reason): return "record \(lsn) does not apply to table \(table): \(reason); this site has diverged"
        case let .outOfOrder(expected, got): return "record \(got) is out of order: expected \(expected)"
        case let .needsRebuild(why): return "the database must be rebuilt from a snapshot and the log: \(why)"
        case let .badRecord(lsn, why): return "record \(lsn) is malformed: \(why)"
        case let .clusterMismatch(expected, found): return "database belongs to cluster \(found), not \(expected)"
        case let .notFound(p): return "no state database at \(p)"
        case let .alreadyExists(p): return "a state database already exists at \(p)"
        case let .io(why): return "I/O error: \(why)"
        case let .snapshot(why): return "snapshot: \(why)"
        case let .preconditionFailed(i): return "statement \(i + 1) changed no row, so the batch was not applied"
        case let .statementTimedOut(i, ms): return "ran longer than \(ms) ms (the limit for all the statements of one write or query together) and was interrupted at statement \(i + 1); nothing was applied"
        }
    }
}
