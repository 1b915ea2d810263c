import CSQLite
import CSQLitePageCache
import Foundation
import TandemModel

/// A value bound to or read from SQL.
public enum SQLValue: Hashable, Sendable, CustomStringConvertible {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])

    public var description: String {
        switch self {
        case .null: "NULL"
        case let .integer(v): String(v)
        case let .real(v): String(v)
        case let .text(v): "'\(v)'"
        case let .blob(v): "blob(\(v.count) bytes)"
        }
    }

    /// Bytes a value occupies, for limits.
    var byteCount: Int {
        switch self {
        case .null, .integer, .real: 8
        case let .text(s): s.utf8.count
        case let .blob(b): b.count
        }
    }
}

/// One parameterized SQL statement.
public struct SQLStatement: Hashable, Sendable {
    public var sql: String
    public var params: [SQLValue]
    /// The whole batch fails (nothing applied) unless this statement changes at least one
    /// row: a conditional write such as "book this slot if no booking overlaps it".
    /// Checked on the primary only; it is not part of the log.
    public var requireChanges: Bool
    public init(_ sql: String, _ params: [SQLValue] = [], requireChanges: Bool = false) {
        self.sql = sql
        self.params = params
        self.requireChanges = requireChanges
    }
}

/// An error from SQLite, with its own message and result codes.
public struct SQLiteError: Error, CustomStringConvertible, Sendable, Equatable {
    public let code: Int32
    public let extendedCode: Int32
    public let message: String

    public var description: String { "\(message) (SQLite \(Self.name(code)), code \(extendedCode))" }

    /// A short, stable name for the primary result code.
    public static func name(_ code: Int32) -> String {
        switch code & 0xFF {
        case SQLITE_ERROR: "SQLITE_ERROR"
        case SQLITE_CONSTRAINT: "SQLITE_CONSTRAINT"
        case SQLITE_TOOBIG: "SQLITE_TOOBIG"
        case SQLITE_BUSY: "SQLITE_BUSY"
        case SQLITE_LOCKED: "SQLITE_LOCKED"
        case SQLITE_AUTH: "SQLITE_AUTH"
        case SQLITE_RANGE: "SQLITE_RANGE"
        case SQLITE_MISMATCH: "SQLITE_MISMATCH"
        case SQLITE_FULL: "SQLITE_FULL"
        case SQLITE_IOERR: "SQLITE_IOERR"
        case SQLITE_CORRUPT: "SQLITE_CORRUPT"
        case SQLITE_NOTADB: "SQLITE_NOTADB"
        case SQLITE_READONLY: "SQLITE_READONLY"
        case SQLITE_CANTOPEN: "SQLITE_CANTOPEN"
        case SQLITE_NOMEM: "SQLITE_NOMEM"
        case SQLITE_INTERRUPT: "SQLITE_INTERRUPT"
        case SQLITE_ABORT: "SQLITE_ABORT"
        case SQLITE_MISUSE: "SQLITE_MISUSE"
        default: "SQLITE_\(code & 0xFF)"
        }
    }
}

/// SQLite's page cache, wrapped so that a commit does not scan the whole cache after a
/// B-tree rebalance (Sources/CSQLitePageCache/pagecache.c says why).
public enum SQLitePageCache {
    /// SQLite's result code for installing the wrapper, which must happen before SQLite
    /// initializes: the first connection installs it. Anything but SQLITE_OK means SQLite
    /// was initialized before (by a direct call into the library) and runs its own cache
    /// unwrapped: correct, only slower. tandemd logs it.
    public static let installation: Int32 = tandem_pagecache_install()

    /// Truncations this thread's connections passed to SQLite's cache, skipped, and (in
    /// check mode) skipped although the real truncation would have dropped pages.
    static var threadTruncations: (passed: UInt64, skipped: UInt64, wrong: UInt64) {
        var passed: UInt64 = 0, skipped: UInt64 = 0, wrong: UInt64 = 0
        tandem_pagecache_thread_counts(&passed, &skipped, &wrong)
        return (passed, skipped, wrong)
    }
}

/// An owned sqlite3 connection.
///
/// Thread safety: a connection is used by one thread at a time; its owner (the state
/// store) serializes every call. It is @unchecked Sendable only so that owner can move
/// between threads.
final class SQLiteConnection: @unchecked Sendable {
    let handle: OpaquePointer
    let path: String

    init(path: String, create: Bool, readOnly: Bool = false) throws(SQLiteError) {
        _ = SQLitePageCache.installation
        var db: OpaquePointer?
        let flags = (readOnly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0)) | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            sqlite3_close_v2(db)
            throw SQLiteError(code: rc, extendedCode: rc, message: "\(message): \(path)")
        }
        handle = db
        self.path = path
        sqlite3_extended_result_codes(db, 1)
    }

    deinit { sqlite3_close_v2(handle) }

    var lastError: SQLiteError {
        SQLiteError(code: sqlite3_errcode(handle), extendedCode: sqlite3_extended_errcode(handle),
                    message: String(cString: sqlite3_errmsg(handle)))
    }

    func check(_ rc: Int32) throws(SQLiteError) {
        guard rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW else { throw lastError }
    }

    /// Runs SQL without parameters or results (set-up, transaction control).
    func exec(_ sql: String) throws(SQLiteError) {
        var err: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(handle, sql, nil, nil, &err)
        if rc != SQLITE_OK {
            let message = err.map { String(cString: $0) } ?? String(cString: sqlite3_errmsg(handle))
            sqlite3_free(err)
            throw SQLiteError(code: rc, extendedCode: sqlite3_extended_errcode(handle), message: message)
        }
    }

    /// Transaction control on the write and apply paths, prepared once: parsing BEGIN,
    /// SAVEPOINT, RELEASE and COMMIT for every write cost more than running them.
    private var kept: [String: PreparedStatement] = [:]

    /// Runs one parameterless statement kept prepared (the caller's authorizer mode must
    /// allow it: SQLite prepares it again after a schema change).
    func execKept(_ sql: String) throws(SQLiteError) {
        let stmt: PreparedStatement
        if let s = kept[sql] {
            stmt = s
        } else {
            stmt = try prepare(sql)
            kept[sql] = stmt
        }
        defer { sqlite3_reset(stmt.handle) }
        _ = try stmt.step()
    }

    func prepare(_ sql: String) throws(SQLiteError) -> PreparedStatement {
        var stmt: OpaquePointer?
        let rc = sqlite3_prepare_v2(handle, sql, -1, &stmt, nil)
        guard rc == SQLITE_OK, let stmt else {
            if rc == SQLITE_OK { throw SQLiteError(code: SQLITE_ERROR, extendedCode: SQLITE_ERROR, message: "empty statement") }
            throw lastError
        }
        return PreparedStatement(stmt, connection: self)
    }

    /// Runs a query and returns all rows (internal use: small results).
    func rows(_ sql: String, _ params: [SQLValue] = []) throws(SQLiteError) -> [[SQLValue]] {
        let stmt = try prepare(sql)
        try stmt.bind(params)
        var out: [[SQLValue]] = []
        while try stmt.step() { out.append(stmt.row()) }
        return out
    }

    var changes: Int64 { sqlite3_changes64(handle) }
    var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }
    var inTransaction: Bool { sqlite3_get_autocommit(handle) == 0 }
}

/// A prepared statement, finalized when released.
final class PreparedStatement {
    let handle: OpaquePointer
    unowned let connection: SQLiteConnection

    init(_ handle: OpaquePointer, connection: SQLiteConnection) {
        self.handle = handle
        self.connection = connection
    }

    deinit { sqlite3_finalize(handle) }

    var parameterCount: Int { Int(sqlite3_bind_parameter_count(handle)) }
    var columnCount: Int { Int(sqlite3_column_count(handle)) }
    var isReadOnly: Bool { sqlite3_stmt_readonly(handle) != 0 }
    var columnNames: [String] { (0..<columnCount).map { String(cString: sqlite3_column_name(handle, Int32($0))) } }

    func bind(_ params: [SQLValue]) throws(SQLiteError) {
        guard params.count == parameterCount else {
            throw SQLiteError(code: SQLITE_RANGE, extendedCode: SQLITE_RANGE,
                              message: "statement has \(parameterCount) parameters but \(params.count) values were given")
        }
        for (i, v) in params.enumerated() {
            let idx = Int32(i + 1)
            let rc: Int32
            switch v {
            case .null: rc = sqlite3_bind_null(handle, idx)
            case let .integer(x): rc = sqlite3_bind_int64(handle, idx, x)
            case let .real(x): rc = sqlite3_bind_double(handle, idx, x)
            case let .text(s): rc = sqlite3_bind_text64(handle, idx, s, UInt64(s.utf8.count), tandem_sqlite_transient(), UInt8(SQLITE_UTF8))
            case let .blob(b):
                if b.isEmpty {
                    rc = sqlite3_bind_zeroblob(handle, idx, 0)
                } else {
                    rc = b.withUnsafeBytes { sqlite3_bind_blob64(handle, idx, $0.baseAddress, UInt64($0.count), tandem_sqlite_transient()) }
                }
            }
            try connection.check(rc)
        }
    }

    /// Steps once: true when a row is ready, false when done.
    func step() throws(SQLiteError) -> Bool {
        let rc = sqlite3_step(handle)
        if rc == SQLITE_ROW { return true }
        if rc == SQLITE_DONE { return false }
        // sqlite3_step's own code is generic after a failed step; the connection has the detail.
        let e = connection.lastError
        throw SQLiteError(code: rc & 0xFF, extendedCode: e.extendedCode, message: e.message)
    }

    func reset() {
        sqlite3_reset(handle)
        sqlite3_clear_bindings(handle)
    }

    func value(_ column: Int) -> SQLValue {
        let c = Int32(column)
        switch sqlite3_column_type(handle, c) {
        case SQLITE_INTEGER: return .integer(sqlite3_column_int64(handle, c))
        case SQLITE_FLOAT: return .real(sqlite3_column_double(handle, c))
        case SQLITE_TEXT:
            guard let p = sqlite3_column_text(handle, c) else { return .text("") }
            let n = Int(sqlite3_column_bytes(handle, c))
            return .text(String(decoding: UnsafeBufferPointer(start: p, count: n), as: UTF8.self))
        case SQLITE_BLOB:
            let n = Int(sqlite3_column_bytes(handle, c))
            guard n > 0, let p = sqlite3_column_blob(handle, c) else { return .blob([]) }
            return .blob([UInt8](UnsafeRawBufferPointer(start: p, count: n)))
        default: return .null
        }
    }

    func row() -> [SQLValue] { (0..<columnCount).map { value($0) } }
}
