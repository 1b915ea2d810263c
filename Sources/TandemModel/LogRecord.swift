/// What a log record carries. The raw values are part of the on-disk and wire formats.
public enum RecordKind: UInt8, Sendable, CustomStringConvertible {
    /// The first record of every new term: committing it commits what came before.
    case noop = 0
    /// A SQLite changeset (the session extension's format) of the rows a write changed.
    case changeset = 1
    /// Schema statements (DDL), replayed as SQL in log order on every site.
    case schema = 2

    public var description: String {
        switch self {
        case .noop: "noop"
        case .changeset: "changeset"
        case .schema: "schema"
        }
    }
}

/// One entry of the replicated write-ahead log.
public struct LogRecord: Hashable, Sendable {
    public var term: Term
    public var lsn: LSN
    public var kind: RecordKind
    /// The record's bytes. A slice, so that records decoded from one received frame share
    /// its memory instead of each taking a copy: a receiving peer spent a fifth of its time
    /// allocating and freeing per-record arrays.
    public var payload: ArraySlice<UInt8>

    public init(term: Term, lsn: LSN, kind: RecordKind, payload: ArraySlice<UInt8>) {
        self.term = term
        self.lsn = lsn
        self.kind = kind
        self.payload = payload
    }

    public init(term: Term, lsn: LSN, kind: RecordKind, payload: [UInt8]) {
        self.init(term: term, lsn: lsn, kind: kind, payload: payload[...])
    }
}
