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
/// - INSERT: `INSERT OR ABORT INTO t VALUES (...)`; a row with that primary key already
///   there is a conflict. (OR ABORT everywhere: a table's own ON CONFLICT REPLACE, IGNORE
///   or ROLLBACK would otherwise delete another row, drop this one, or end the caller's
///   transaction, on a replica that only replays what the primary did.)
/// - DELETE: deletes the row by primary key only if every column still holds the old
///   value (`IS`); no row deleted is a conflict.
/// - UPDATE: sets the changed columns of the row with that primary key only if each
///   changed column still holds its old value; no row changed is a conflict.
/// - Any other constraint failure (UNIQUE, NOT NULL, CHECK) is retried after the table's
///   other changes, round after round while a round makes progress, and only then is a
///   conflict: a change may need a later one first (a write that moves a UNIQUE value
///   from one row to another, or its inverse, lists the rows in either order: a
///   changeset lists a table's rows in hash order).
///
/// Stricter in one way: `sqlite3changeset_apply` skips, without an error, the changes to a
/// table this database lacks or whose primary key differs from the changeset's header,
/// and fills the missing columns of a changeset with fewer columns than the table with
/// their defaults. Here each is a conflict: a replica whose schema differs from the
/// primary's has diverged, and the store replicates schema changes in log order, so its
/// own changesets always match.
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
        var exists: PreparedStatement?
        /// UPDATE statements by the set of columns they change.
        var updates: [[Bool]: PreparedStatement] = [:]

        /// A rowid table (not WITHOUT ROWID): a row put back keeps its rowid.
        let hasRowid: Bool

        init(name: String, columns: [(name: String, pk: Int)], hasRowid: Bool) {
            self.hasRowid = hasRowid
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
    /// Changes that failed a constraint and were tried again later, since this applier
    /// was made (tests read it).
    private(set) var retriedChanges = 0
    /// Changes applied by replacing rows (`replace`), since this applier was made.
    private(set) var replacedChanges = 0
    /// SQLite's schema cookie when `tables` was filled: any schema change empties it.
    private var cookie: Int64 = -1
    private var cookieStatement: PreparedStatement?
    /// The borrowed row of the change being applied.
    private let scratch = Row(old: [], new: [], owned: false)

    init(db: SQLiteConnection) { self.db = db }

    /// Forgets every kept statement (a change of the foreign key or trigger setting, which
    /// SQLite compiles into statements, or a schema change rolled back, after which SQLite
    /// may reuse its schema version number).
    func invalidate() {
        tables.removeAll()
        cookie = -1
    }

    /// Applies `changeset` inside the caller's transaction.
    func apply(_ changeset: UnsafeRawBufferPointer) throws(Failure) {
        guard changeset.count > 0 else { return }
        guard changeset.count <= Int(Int32.max) else { throw .malformed(code: SQLITE_TOOBIG) }
        // SQLite 3.40's changeset readers never return on some malformed input (a lone
        // table header byte spins in sqlite3changeset_next): its structure is checked first.
        guard Self.isWellFormed(changeset) else { throw .malformed(code: SQLITE_CORRUPT) }
        try checkSchema()
        var iterator: OpaquePointer?
        var rc = sqlite3changeset_start(&iterator, Int32(changeset.count), UnsafeMutableRawPointer(mutating: changeset.baseAddress))
        guard rc == SQLITE_OK, let iterator else { throw .malformed(code: rc) }
        var failure: Failure?
        var deferred: [Deferred] = []
        var current: Table?
        while failure == nil {
            rc = sqlite3changeset_next(iterator)
            guard rc == SQLITE_ROW else { break }
            do throws(Failure) {
                let (op, table) = try change(iterator)
                // As SQLite does: what failed a constraint is retried before the next table.
                if let current, current !== table { try retry(&deferred) }
                current = table
                try scratch.fill(iterator, op: op, columns: table.columnCount)
                let row = scratch
                if case let .constraint(error) = try execute(op, table, row) {
                    try deferOrFail(Deferred(op: op, table: table, row: try row.owningCopy()), error, into: &deferred)
                }
            } catch {
                failure = error
            }
        }
        let end = sqlite3changeset_finalize(iterator)
        if let failure { throw failure }
        // A corrupt changeset shows as an error from `next` or from `finalize`.
        if rc != SQLITE_DONE { throw .malformed(code: rc) }
        if end != SQLITE_OK { throw .malformed(code: end) }
        try retry(&deferred)
    }

    /// A change's values: borrowed from the iterator while it stands on the change (one
    /// such row, refilled for each change: no allocation per change), or copies
    /// (`sqlite3_value_dup`) for a change retried later.
    private final class Row {
        private(set) var old: [OpaquePointer?]
        private(set) var new: [OpaquePointer?]
        private let owned: Bool

        init(old: [OpaquePointer?], new: [OpaquePointer?], owned: Bool) {
            self.old = old
            self.new = new
            self.owned = owned
        }

        /// Refills a borrowed row with the values of the change the iterator stands on
        /// (nil where undefined).
        func fill(_ it: OpaquePointer, op: Int32, columns: Int) throws(Failure) {
            guard !owned else { throw .malformed(code: SQLITE_MISUSE) }
            old.removeAll(keepingCapacity: true)
            new.removeAll(keepingCapacity: true)
            for i in 0..<columns {
                var o: OpaquePointer?
                var n: OpaquePointer?
                if op != SQLITE_INSERT {
                    guard sqlite3changeset_old(it, Int32(i), &o) == SQLITE_OK else { throw .malformed(code: SQLITE_CORRUPT) }
                }
                if op != SQLITE_DELETE {
                    guard sqlite3changeset_new(it, Int32(i), &n) == SQLITE_OK else { throw .malformed(code: SQLITE_CORRUPT) }
                }
                old.append(o)
                new.append(n)
            }
        }

        deinit {
            if owned { for v in old + new { sqlite3_value_free(v) } }
        }

        func owningCopy() throws(Failure) -> Row {
            func dup(_ values: [OpaquePointer?]) throws(Failure) -> [OpaquePointer?] {
                var out: [OpaquePointer?] = []
                for v in values {
                    let copy = sqlite3_value_dup(v)
                    if v != nil && copy == nil {
                        for c in out { sqlite3_value_free(c) }
                        throw .sqlite(SQLiteError(code: SQLITE_NOMEM, extendedCode: SQLITE_NOMEM, message: "out of memory copying a change to retry it"))
                    }
                    out.append(copy)
                }
                return out
            }
            let old = try dup(self.old)
            do {
                return Row(old: old, new: try dup(self.new), owned: true)
            } catch {
                for v in old { sqlite3_value_free(v) }
                throw error
            }
        }
    }

    /// A change that failed a constraint, to be tried again after the table's others.
    private struct Deferred {
        let op: Int32
        let table: Table
        let row: Row
    }

    /// What running one change came to, short of a conflict (which throws).
    private enum Outcome {
        case applied
        case constraint(SQLiteError)
    }

    private static func verb(_ op: Int32) -> String {
        op == SQLITE_INSERT ? "the row cannot be inserted" : op == SQLITE_DELETE ? "the row cannot be deleted" : "the row cannot be updated"
    }

    /// A constraint failure: an INSERT whose key is taken is a conflict at once; anything
    /// else waits for a retry.
    private func deferOrFail(_ change: Deferred, _ error: SQLiteError, into deferred: inout [Deferred]) throws(Failure) {
        if change.op == SQLITE_INSERT, try rowExists(change.table, key: change.row.new) {
            throw .conflict(table: change.table.name, reason: "a row with this primary key already exists (\(error.message))")
        }
        deferred.append(change)
        retriedChanges += 1
    }

    /// Retries the deferred changes, round after round while a round applies at least one.
    /// After a round without progress the rest is applied by replacing rows (`replace`);
    /// what fails even then is a conflict.
    private func retry(_ deferred: inout [Deferred]) throws(Failure) {
        while !deferred.isEmpty {
            var still: [Deferred] = []
            var first: SQLiteError?
            for change in deferred {
                if case let .constraint(error) = try execute(change.op, change.table, change.row) {
                    try deferOrFail(change, error, into: &still)
                    if first == nil { first = error }
                }
            }
            if still.count == deferred.count {
                // No order works: the changes form a cycle (two rows trading a UNIQUE
                // value), which sqlite3changeset_apply cannot apply either.
                deferred = []
                try replace(still, first)
                return
            }
            deferred = still
        }
    }

    /// Whether `buf` is a sequence of table headers ('T', the column count, one key byte
    /// per column, the name and a NUL), each followed by changes (an op byte, an indirect
    /// byte, then the old and new values the op carries), every value complete, and every
    /// row the op must hold whole: an INSERT's new row and a DELETE's old row have a value
    /// for every column, and the key of an INSERT's new row, a DELETE's old row and an
    /// UPDATE's old row is never NULL (SQLite's changegroup, which the store no longer
    /// uses, read a key's length from the bytes after it otherwise, past the buffer; kept
    /// as a defence for the readers that remain). The session extension's format;
    /// patchsets are not accepted.
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
        /// Skips one value; returns its type (0 undefined, 1 integer, 2 real, 3 text,
        /// 4 blob, 5 NULL), or nil when it is incomplete or of no known type.
        func value() -> UInt8? {
            guard at < buf.count else { return nil }
            let type = buf[at]
            at += 1
            switch type {
            case 0, 5: return type
            case 1, 2:
                at += 8
                return at <= buf.count ? type : nil
            case 3, 4:
                guard let n = varint(), n >= 0, n <= buf.count - at else { return nil }
                at += n
                return type
            default: return nil
            }
        }
        /// Skips a row of `keys.count` values: `whole`, every one defined; the key columns
        /// always defined and not NULL, unless `keysFree` (an UPDATE's new row).
        func row(_ keys: [Bool], whole: Bool, keysFree: Bool = false) -> Bool {
            for key in keys {
                guard let type = value() else { return false }
                if whole && type == 0 { return false }
                if key && !keysFree && (type == 0 || type == 5) { return false }
            }
            return true
        }
        var keys: [Bool] = []
        while at < buf.count {
            let op = buf[at]
            if op == UInt8(ascii: "T") {
                at += 1
                guard let n = varint(), n > 0, n <= buf.count - at else { return false }
                keys = (at..<(at + n)).map { buf[$0] != 0 }
                at += n
                // The table name, NUL-terminated.
                while at < buf.count && buf[at] != 0 { at += 1 }
                guard at < buf.count else { return false }
                at += 1
                continue
            }
            guard !keys.isEmpty, at + 2 <= buf.count else { return false }
            at += 2
            switch Int32(op) {
            case SQLITE_INSERT, SQLITE_DELETE:
                guard row(keys, whole: true) else { return false }
            case SQLITE_UPDATE:
                guard row(keys, whole: false), row(keys, whole: false, keysFree: true) else { return false }
            default:
                return false
            }
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

    /// Applies changes that no order can apply one by one (a cycle of UNIQUE values
    /// between rows): first every updated row is taken out, then each is put back with its
    /// new values (and its rowid), and the inserted rows go in. Inside the caller's
    /// transaction, with foreign keys and triggers off, the end state is the one the
    /// primary reached. What still fails a constraint then is a conflict.
    private func replace(_ changes: [Deferred], _ error: SQLiteError?) throws(Failure) {
        guard let change = changes.first, let error else { return }
        replacedChanges += changes.count
        guard changes.allSatisfy({ $0.op != SQLITE_DELETE }) else {
            throw .conflict(table: change.table.name, reason: "\(Self.verb(change.op)): \(error.message)")
        }
        var rows: [(table: Table, values: [OpaquePointer?])] = []
        defer { for r in rows { for v in r.values { sqlite3_value_free(v) } } }
        for c in changes where c.op == SQLITE_UPDATE {
            let t = c.table
            let key = (0..<t.columnCount).filter { t.keyPositions[$0] > 0 }
            let read = try prepared("SELECT \(t.hasRowid ? "rowid, " : "")\(t.quotedColumns.joined(separator: ", ")) FROM \(t.quotedName) WHERE \(t.keyCondition)")
            for i in key { try bind(read, i + 1, c.row.old[i]) }
            let found: Bool
            do { found = try read.step() } catch { throw .sqlite(error) }
            guard found else { throw .conflict(table: t.name, reason: "the row to change does not exist") }
            let offset = t.hasRowid ? 1 : 0
            var values: [OpaquePointer?] = []
            for i in 0..<(t.columnCount + offset) {
                let column = i - offset
                // The new value of a changed column, else what the row holds (its rowid first).
                let source = column >= 0 && t.keyPositions[column] == 0 && c.row.new[column] != nil
                    ? c.row.new[column] : sqlite3_column_value(read.handle, Int32(i))
                let copy = sqlite3_value_dup(source)
                guard copy != nil else {
                    for v in values { sqlite3_value_free(v) }
                    throw .sqlite(SQLiteError(code: SQLITE_NOMEM, extendedCode: SQLITE_NOMEM, message: "out of memory copying a row"))
                }
                values.append(copy)
            }
            read.reset()
            rows.append((t, values))
            // The old values were checked when the UPDATE failed only on a constraint.
            let delete = try prepared("DELETE FROM \(t.quotedName) WHERE \(t.keyCondition)")
            for i in key { try bind(delete, i + 1, c.row.old[i]) }
            if case let .constraint(e) = try run(delete) { throw .conflict(table: t.name, reason: "the row cannot be replaced: \(e.message)") }
        }
        for (t, values) in rows {
            let columns = (t.hasRowid ? ["rowid"] : []) + t.quotedColumns
            let insert = try prepared("INSERT OR ABORT INTO \(t.quotedName) (\(columns.joined(separator: ", "))) VALUES (\((1...columns.count).map { "?\($0)" }.joined(separator: ", ")))")
            for (i, v) in values.enumerated() { try bind(insert, i + 1, v) }
            if case let .constraint(e) = try run(insert) { throw .conflict(table: t.name, reason: "the row cannot be updated: \(e.message)") }
        }
        for c in changes where c.op == SQLITE_INSERT {
            if case let .constraint(e) = try insert(c.row, into: c.table) {
                throw .conflict(table: c.table.name, reason: "the row cannot be inserted: \(e.message)")
            }
        }
    }

    /// The operation and table of the change the iterator stands on.
    private func change(_ it: OpaquePointer) throws(Failure) -> (op: Int32, table: Table) {
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
        guard op == SQLITE_INSERT || op == SQLITE_DELETE || op == SQLITE_UPDATE else { throw .malformed(code: SQLITE_CORRUPT) }
        return (op, try table(String(cString: namePointer), columns: Int(columns), keyFlags: keyFlags))
    }

    private func execute(_ op: Int32, _ table: Table, _ row: Row) throws(Failure) -> Outcome {
        switch op {
        case SQLITE_INSERT: try insert(row, into: table)
        case SQLITE_DELETE: try delete(row, from: table)
        default: try update(row, in: table)
        }
    }

    /// The table's kept state, read on first use; a conflict when the database's table
    /// does not match the changeset's header.
    private func table(_ name: String, columns: Int, keyFlags: UnsafeMutablePointer<UInt8>) throws(Failure) -> Table {
        let table: Table
        // SQLite's names are case-insensitive for ASCII letters: one entry however a
        // changeset spells it.
        let key = String(decoding: name.utf8.map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 }, as: UTF8.self)
        if let t = tables[key] {
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
            var hasRowid = true
            do {
                let s = try db.prepare("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1 COLLATE NOCASE")
                try s.bind([.text(name)])
                if try s.step(), case let .integer(wr) = s.value(0) { hasRowid = wr == 0 }
            } catch {
                throw .sqlite(error)
            }
            table = Table(name: name, columns: list, hasRowid: hasRowid)
            tables[key] = table
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

    /// Binds every column's value as ?1...?n: the new row (an INSERT's) or the old one (a
    /// DELETE's), each of which the changeset must hold in full.
    private func bindRow(_ s: PreparedStatement, _ values: [OpaquePointer?]) throws(Failure) {
        for (i, v) in values.enumerated() {
            guard v != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, v)
        }
    }

    /// Steps a write: a constraint failure is returned, anything else but success throws.
    private func run(_ s: PreparedStatement) throws(Failure) -> Outcome {
        defer { s.reset() }
        do {
            _ = try s.step()
            return .applied
        } catch {
            // Retrying is only sound while the caller's transaction still holds everything
            // applied so far (OR ABORT keeps it; this guards the assumption).
            if error.code & 0xFF == SQLITE_CONSTRAINT && db.inTransaction { return .constraint(error) }
            throw .sqlite(error)
        }
    }

    private func insert(_ row: Row, into table: Table) throws(Failure) -> Outcome {
        let s: PreparedStatement
        if let kept = table.insert {
            s = kept
        } else {
            let marks = (1...table.columnCount).map { "?\($0)" }.joined(separator: ", ")
            s = try prepared("INSERT OR ABORT INTO \(table.quotedName) VALUES (\(marks))")
            table.insert = s
        }
        try bindRow(s, row.new)
        return try run(s)
    }

    private func delete(_ row: Row, from table: Table) throws(Failure) -> Outcome {
        let s: PreparedStatement
        if let kept = table.delete {
            s = kept
        } else {
            let others = table.quotedColumns.indices.filter { table.keyPositions[$0] == 0 }
                .map { " AND \(table.quotedColumns[$0]) IS ?\($0 + 1)" }.joined()
            s = try prepared("DELETE FROM \(table.quotedName) WHERE \(table.keyCondition)\(others)")
            table.delete = s
        }
        try bindRow(s, row.old)
        let outcome = try run(s)
        if case .applied = outcome, db.changes == 0 { throw .conflict(table: table.name, reason: try missing(row, table)) }
        return outcome
    }

    private func update(_ row: Row, in table: Table) throws(Failure) -> Outcome {
        // Which columns change: those with a new value (a key column's new value is
        // ignored, as sqlite3changeset_apply ignores it: the key never changes in one).
        let changed = (0..<table.columnCount).map { table.keyPositions[$0] == 0 && row.new[$0] != nil }
        guard changed.contains(true) else { return .applied }
        let s: PreparedStatement
        if let kept = table.updates[changed] {
            s = kept
        } else {
            // ?i (1-based column i) is the old value, ?(n + i) the new one.
            let n = table.columnCount
            let sets = changed.indices.filter { changed[$0] }.map { "\(table.quotedColumns[$0]) = ?\(n + $0 + 1)" }
                .joined(separator: ", ")
            let checks = changed.indices.filter { changed[$0] }.map { " AND \(table.quotedColumns[$0]) IS ?\($0 + 1)" }.joined()
            s = try prepared("UPDATE OR ABORT \(table.quotedName) SET \(sets) WHERE \(table.keyCondition)\(checks)")
            if table.updates.count >= Self.maxUpdateShapes { table.updates.removeAll() }
            table.updates[changed] = s
        }
        for i in 0..<table.columnCount where table.keyPositions[i] > 0 || changed[i] {
            guard row.old[i] != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, row.old[i])
            if changed[i] { try bind(s, table.columnCount + i + 1, row.new[i]) }
        }
        let outcome = try run(s)
        if case .applied = outcome, db.changes == 0 { throw .conflict(table: table.name, reason: try missing(row, table)) }
        return outcome
    }

    /// Whether a row with the key in `values` exists.
    private func rowExists(_ table: Table, key values: [OpaquePointer?]) throws(Failure) -> Bool {
        let s: PreparedStatement
        if let kept = table.exists {
            s = kept
        } else {
            s = try prepared("SELECT 1 FROM \(table.quotedName) WHERE \(table.keyCondition)")
            table.exists = s
        }
        defer { s.reset() }
        for i in 0..<table.columnCount where table.keyPositions[i] > 0 {
            guard values[i] != nil else { throw .malformed(code: SQLITE_CORRUPT) }
            try bind(s, i + 1, values[i])
        }
        do { return try s.step() } catch { throw .sqlite(error) }
    }

    /// Why a DELETE or UPDATE changed no row: the row is absent, or holds other values.
    private func missing(_ row: Row, _ table: Table) throws(Failure) -> String {
        try rowExists(table, key: row.old) ? "the row holds other values than the change expects" : "the row to change does not exist"
    }
}
