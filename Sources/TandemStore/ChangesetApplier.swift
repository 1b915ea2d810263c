import CSQLite

/// Applies changesets (the session extension's format) with statements kept prepared per
/// table, in place of `sqlite3changeset_apply`.
///
/// Why: `sqlite3changeset_apply` reads each table's column list (a PRAGMA) and prepares
/// its INSERT, UPDATE and DELETE statements again on every call. A replica applies what
/// each append released, often one write, so at one client a replica's loop spent about
/// a third of its CPU in SQLite's parser and code generator. This keeps the column lists
/// and statements until the schema changes, and otherwise does what that function does
/// when every conflict aborts (the only way the store uses it):
///
/// - INSERT: `INSERT INTO t VALUES (...)`; a constraint failure (the row exists, NOT
///   NULL, CHECK, UNIQUE) is a conflict.
/// - DELETE: deletes the row by primary key only if every column still holds the old
///   value (`IS`); no row deleted is a conflict.
/// - UPDATE: sets the changed columns of the row with that primary key only if each
///   changed column still holds its old value; no row changed is a conflict.
///
/// Stricter in one way: `sqlite3changeset_apply` skips, without an error, the changes to a
/// table this database lacks or whose columns or primary key differ from the changeset's
/// header. Here that is a conflict: a replica whose schema differs from the primary's has
/// diverged, and silently dropping rows would hide it.
///
/// Foreign keys and triggers must be off (`StateStore.setActions`), as they are for
/// `sqlite3changeset_apply` in the store: the changeset already holds their effects.
/// A failure leaves partial changes: the caller rolls its transaction back.
final class ChangesetApplier {
    /// Why a changeset could not be applied.
    enum Failure: Error {
        case conflict(table: String, reason: String)
        case malformed(code: Int32)
        case sqlite(SQLiteError)
    }

    /// One table's columns and its statements.
    private final class Table {
        let name: String
        let columnCount: Int
        /// Each column's position in the primary key (0: not in it), as the header has it.
        let keyPositions: [UInt8]
        let quotedColumns: [String]
        let quotedName: String
        var insert: PreparedStatement?
        var delete: PreparedStatement?
        /// UPDATE statements by the set of columns they change.
        var updates: [[Bool]: PreparedStatement] = [:]

        init(name: String, columns: [(name: String, pk: Int)]) {
            func quoted(_ s: String) -> String { "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }
            self.name = name
            columnCount = columns.count
            keyPositions = columns.map { UInt8(clamping: $0.pk) }
            quotedColumns = columns.map { quoted($0.name) }
            quotedName = "\"main\"." + quoted(name)
        }

        var keyCondition: String {
            quotedColumns.indices.filter { keyPositions[$0] > 0 }.map { "\(quotedColumns[$0]) = ?\($0 + 1)" }
                .joined(separator: " AND ")
        }
    }

    /// At most this many UPDATE shapes are kept per table; beyond, the cache starts over
    /// (a bound on memory for tables with many columns changed in many combinations).
    static let maxUpdateShapes = 64

    private let db: SQLiteConnection
    private var tables: [String: Table] = [:]
    /// SQLite's schema cookie when `tables` was filled: any schema change empties it.
    private var cookie: Int64 = -1
    private var cookieStatement: PreparedStatement?

    init(db: SQLiteConnection) { self.db = db }

    /// Forgets every kept statement (a change of the foreign key or trigger setting, which
    /// SQLite compiles into statements).
    func invalidate() {
        tables.removeAll()
        cookie = -1
    }

    /// Applies `changeset` inside the caller's transaction.
    func apply(_ changeset: UnsafeRawBufferPointer) throws(Failure) {
        guard changeset.count > 0 else { return }
        // SQLite 3.40's iterator never returns on some malformed input (a lone table
        // header byte spins in sqlite3changeset_next): its structure is checked first.
        guard Self.isWellFormed(changeset) else { throw .malformed(code: SQLITE_CORRUPT) }
        try checkSchema()
        var iterator: OpaquePointer?
        var rc = sqlite3changeset_start(&iterator, Int32(changeset.count), UnsafeMutableRawPointer(mutating: changeset.baseAddress))
        guard rc == SQLITE_OK, let iterator else { throw .malformed(code: rc) }
        var failure: Failure?
        while failure == nil {
            rc = sqlite3changeset_next(iterator)
            guard rc == SQLITE_ROW else { break }
            do { try applyOne(iterator) } catch { failure = error }
        }
        let end = sqlite3changeset_finalize(iterator)
        if let failure { throw failure }
        // A corrupt changeset shows as an error from `next` or from `finalize`.
        if rc != SQLITE_DONE { throw .malformed(code: rc) }
        if end != SQLITE_OK { throw .malformed(code: end) }
    }

    /// Whether `buf` is a sequence of table headers ('T', the column count, one key byte
    /// per column, the name and a NUL), each followed by changes (an op byte, an indirect
    /// byte, then the old and new values the op carries), every value complete. The
    /// session extension's format; patchsets are not accepted.
    static func isWellFormed(_ buf: UnsafeRawBufferPointer) -> Bool {
        var at = 0
        /// SQLite's varint (big-endian groups of 7 bits, at most 9 bytes), as a length.
        func varint() -> Int? {
            var value = 0
            for i in 0..<9 {
                guard at < buf.count else { return nil }
                let byte = Int(buf[at])
                at += 1
                if i == 8 { return value << 8 | byte }
                value = value << 7 | (byte & 0x7F)
                if byte & 0x80 == 0 { return value }
                guard value < 1 << 31 else { return nil }
            }
            return nil
        }
        func skipValue() -> Bool {
            guard at < buf.count else { return false }
            let type = buf[at]
            at += 1
            switch type {
            case 0, 5: return true                       // undefined, NULL
            case 1, 2: at += 8; return at <= buf.count   // integer, real
            case 3, 4:                                    // text, blob
                guard let n = varint(), n >= 0, n <= buf.count - at else { return false }
                at += n
                return true
            default: return false
            }
        }
        var columns = -1
        while at < buf.count {
            let op = buf[at]
            if op == UInt8(ascii: "T") {
                at += 1
                guard let n = varint(), n > 0, n <= buf.count - at else { return false }
                columns = n
                at += n
                // The table name, NUL-terminated.
                while at < buf.count && buf[at] != 0 { at += 1 }
                guard at < buf.count else { return false }
                at += 1
                continue
            }
            guard columns > 0, at + 2 <= buf.count else { return false }
            at += 2
            let values: Int
            switch Int32(op) {
            case SQLITE_INSERT, SQLITE_DELETE: values = columns
            case SQLITE_UPDATE: values = 2 * columns
            default: return false
            }
            for _ in 0..<values where !skipValue() { return false }
        }
        return true
    }

    private func checkSchema() throws(Failure) {
        do {
            if cookieStatement == nil { cookieStatement = try db.prepare("PRAGMA main.schema_version") }
            guard let s = cookieStatement else { return }
            defer { sqlite3_reset(s.handle) }
            guard try s.step(), case let .integer(now) = s.value(0) else { return }
            if now != cookie {
                tables.removeAll()
                cookie = now
            }
        } catch {
            throw .sqlite(error)
        }
    }

    private func applyOne(_ it: OpaquePointer) throws(Failure) {
        var namePointer: UnsafePointer<CChar>?
        var columns: Int32 = 0
        var op: Int32 = 0
        var indirect: Int32 = 0
        guard sqlite3changeset_op(it, &namePointer, &columns, &op, &indirect) == SQLITE_OK, let namePointer else {
            throw .malformed(code: SQLITE_CORRUPT)
        }
        var keyFlags: UnsafeMutablePointer<UInt8>?
        var keyColumns: Int32 = 0
        guard sqlite3changeset_pk(it, &keyFlags, &keyColumns) == SQLITE_OK, let keyFlags else {
            throw .malformed(code: SQLITE_CORRUPT)
        }
        let table = try self.table(String(cString: namePointer), columns: Int(columns), keyFlags: keyFlags)
        switch op {
        case SQLITE_INSERT: try insert(it, into: table)
        case SQLITE_DELETE: try delete(it, from: table)
        case SQLITE_UPDATE: try update(it, in: table)
        default: throw .malformed(code: SQLITE_CORRUPT)
        }
    }

    /// The table's kept state, read on first use; a conflict when the database's table
    /// does not match the changeset's header.
    private func table(_ name: String, columns: Int, keyFlags: UnsafeMutablePointer<UInt8>) throws(Failure) -> Table {
        let table: Table
        if let t = tables[name] {
            table = t
        } else {
            var list: [(name: String, pk: Int)] = []
            do {
                let s = try db.prepare("SELECT name, pk FROM pragma_table_info(?1, 'main') ORDER BY cid")
                try s.bind([.text(name)])
                while try s.step() {
                    guard case let .text(column) = s.value(0), case let .integer(pk) = s.value(1) else { continue }
                    list.append((column, Int(pk)))
                }
            } catch {
                throw .sqlite(error)
            }
            guard !list.isEmpty else {
                throw .conflict(table: name, reason: "this site has no table \(name)")
            }
            table = Table(name: name, columns: list)
            tables[name] = table
        }
        guard table.columnCount == columns,
              (0..<columns).allSatisfy({ table.keyPositions[$0] == keyFlags[$0] }) else {
            throw .conflict(table: name, reason: "the change's columns or primary key differ from this site's table")
        }
        return table
    }

    private func prepared(_ sql: String) throws(Failure) -> PreparedStatement {
        do { return try db.prepare(sql) } catch { throw .sqlite(error) }
    }

    private func bind(_ s: PreparedStatement, _ index: Int, _ value: OpaquePointer?) throws(Failure) {
        let rc = sqlite3_bind_value(s.handle, Int32(index), value)
        guard rc == SQLITE_OK else { throw .sqlite(db.lastError) }
    }

    /// Steps a write; a constraint failure is a conflict, anything else an SQLite error.
    private func run(_ s: PreparedStatement, table: Table, constraint: String) throws(Failure) {
        defer { s.reset() }
        do {
            _ = try s.step()
        } catch {
            if error.code & 0xFF == SQLITE_CONSTRAINT {
                throw .conflict(table: table.name, reason: "\(constraint): \(error.message)")
            }
            throw .sqlite(error)
        }
    }

    private func insert(_ it: OpaquePointer, into table: Table) throws(Failure) {
        let s: PreparedStatement
        if let kept = table.insert {
            s = kept
        } else {
            let marks = (1...table.columnCount).map { "?\($0)" }.joined(separator: ", ")
            s = try prepared("INSERT INTO \(table.quotedName) VALUES (\(marks))")
            table.insert = s
        }
        for i in 0..<table.columnCount {
            var v: OpaquePointer?
            guard sqlite3changeset_new(it, Int32(i), &v) == SQLITE_OK, v != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, v)
        }
        try run(s, table: table, constraint: "the row cannot be inserted")
    }

    private func delete(_ it: OpaquePointer, from table: Table) throws(Failure) {
        let s: PreparedStatement
        if let kept = table.delete {
            s = kept
        } else {
            let others = table.quotedColumns.indices.filter { table.keyPositions[$0] == 0 }
                .map { " AND \(table.quotedColumns[$0]) IS ?\($0 + 1)" }.joined()
            s = try prepared("DELETE FROM \(table.quotedName) WHERE \(table.keyCondition)\(others)")
            table.delete = s
        }
        for i in 0..<table.columnCount {
            var v: OpaquePointer?
            guard sqlite3changeset_old(it, Int32(i), &v) == SQLITE_OK, v != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, v)
        }
        try run(s, table: table, constraint: "the row cannot be deleted")
        if db.changes == 0 { throw .conflict(table: table.name, reason: missing(it, table)) }
    }

    private func update(_ it: OpaquePointer, in table: Table) throws(Failure) {
        // Which columns change: those with a new value (the key never does in a changeset).
        var changed = [Bool](repeating: false, count: table.columnCount)
        var new = [OpaquePointer?](repeating: nil, count: table.columnCount)
        for i in 0..<table.columnCount where table.keyPositions[i] == 0 {
            var v: OpaquePointer?
            guard sqlite3changeset_new(it, Int32(i), &v) == SQLITE_OK else { throw .malformed(code: SQLITE_CORRUPT) }
            if v != nil { changed[i] = true; new[i] = v }
        }
        guard changed.contains(true) else { return }
        let s: PreparedStatement
        if let kept = table.updates[changed] {
            s = kept
        } else {
            // ?i (1-based column i) is the old value, ?(n + i) the new one.
            let n = table.columnCount
            let sets = changed.indices.filter { changed[$0] }.map { "\(table.quotedColumns[$0]) = ?\(n + $0 + 1)" }
                .joined(separator: ", ")
            let checks = changed.indices.filter { changed[$0] }.map { " AND \(table.quotedColumns[$0]) IS ?\($0 + 1)" }.joined()
            s = try prepared("UPDATE \(table.quotedName) SET \(sets) WHERE \(table.keyCondition)\(checks)")
            if table.updates.count >= Self.maxUpdateShapes { table.updates.removeAll() }
            table.updates[changed] = s
        }
        for i in 0..<table.columnCount where table.keyPositions[i] > 0 || changed[i] {
            var old: OpaquePointer?
            guard sqlite3changeset_old(it, Int32(i), &old) == SQLITE_OK, old != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, old)
            if changed[i] { try bind(s, table.columnCount + i + 1, new[i]) }
        }
        try run(s, table: table, constraint: "the row cannot be updated")
        if db.changes == 0 { throw .conflict(table: table.name, reason: missing(it, table)) }
    }

    /// Why a DELETE or UPDATE changed no row: the row is absent, or holds other values.
    private func missing(_ it: OpaquePointer, _ table: Table) -> String {
        let keys = table.quotedColumns.indices.filter { table.keyPositions[$0] > 0 }
        guard let s = try? db.prepare("SELECT 1 FROM \(table.quotedName) WHERE \(table.keyCondition)") else {
            return "the row to change does not exist or holds other values than the change expects"
        }
        for i in keys {
            var v: OpaquePointer?
            guard sqlite3changeset_old(it, Int32(i), &v) == SQLITE_OK else { break }
            sqlite3_bind_value(s.handle, Int32(i + 1), v)
        }
        let exists = (try? s.step()) ?? false
        return exists ? "the row holds other values than the change expects" : "the row to change does not exist"
    }
}
