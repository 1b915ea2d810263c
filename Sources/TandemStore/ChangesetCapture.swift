import CSQLite
import Foundation

/// Captures the row changes of one write through SQLite's pre-update hook and encodes
/// them, with their inverse, in the session extension's changeset format (what
/// `sqlite3changeset_apply` and `sqlite3changeset_invert` read).
///
/// Why not the session extension itself: a session cannot be reset in SQLite 3.40, so
/// each write needed a session of its own, and each session read every table's column
/// list (a PRAGMA, twice) and prepared the query that reads changed rows back: about a
/// seventh of the primary's CPU per write. This keeps the column lists until the schema
/// changes and the read-back queries prepared, and does what the session does with them:
///
/// - The first change to a row (keyed by its primary key) keeps the row as it was, or
///   that it did not exist; later changes to the same row leave that alone.
/// - An UPDATE that changes the primary key counts against both keys, the old one as
///   gone and the new one as new.
/// - At the end, each kept row is read again by key: absent before and now, nothing; new,
///   an INSERT of the row; gone, a DELETE of the old row; both, an UPDATE carrying the
///   primary key and the columns that changed (nothing when none did).
/// - Tables without a primary key are not captured (they cannot be created through the
///   store), nor SQLite's own `sqlite_` tables (`sqlite_stat1` comes from ANALYZE, which
///   is logged as a statement and rerun on every site). A row whose primary key holds a
///   NULL (SQLite allows one in a non-integer key) cannot be addressed on a replica, and
///   neither can a table whose row does not match its column list (generated columns):
///   the write that makes one fails instead of being logged without it.
/// - A change made by a trigger or a foreign key action is marked indirect unless the
///   same row was also changed directly.
///
/// One owner at a time (the store's), like the connection it hooks. No session of the
/// session extension may be created on that connection: it would take this hook's
/// context for a session of its own.
final class ChangesetCapture {
    /// A table's columns, as the changeset needs them.
    final class Table {
        let name: String
        let nameBytes: [UInt8]
        let columnCount: Int
        /// Each column's position in the primary key (1, 2, ...; 0 when not in it): the
        /// changeset's table header carries these, and `sqlite3changeset_apply` skips a
        /// table whose header does not match the replica's own (a composite key written
        /// as flags would never apply).
        let keyPositions: [UInt8]
        let keyColumns: [Int]
        /// Columns of REAL affinity: an integer read from one is written as a float, as
        /// SQLite returns it from a query, so that the before and after images compare.
        let real: [Bool]
        let readBack: String
        var readStatement: PreparedStatement?
        /// What a query reads for each column from a row stored without it, serialized:
        /// its declared default, or NULL without one (nil: not worked out).
        var defaults: [[UInt8]?]

        /// A column as `pragma_table_info` lists it.
        typealias Column = (name: String, type: String, pk: Int, defaultSQL: String?)

        init(name: String, columns: [Column]) {
            self.name = name
            nameBytes = Array(name.utf8)
            columnCount = columns.count
            keyPositions = columns.map { UInt8(clamping: $0.pk) }
            keyColumns = columns.indices.filter { columns[$0].pk > 0 }
            real = columns.map { Table.affinity($0.type) == .real }
            func quoted(_ s: String) -> String { "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }
            let condition = keyColumns.enumerated().map { "\(quoted(columns[$0.element].name)) IS ?\($0.offset + 1)" }
                .joined(separator: " AND ")
            readBack = "SELECT * FROM \"main\".\(quoted(name)) WHERE \(condition)"
            defaults = Array(repeating: [UInt8(SQLITE_NULL)], count: columns.count)
        }

        enum Affinity { case integer, text, blob, real, numeric }

        /// SQLite's rules for a declared type's affinity (section 3.1 of its datatype
        /// document), in their order: INT first, then text, then BLOB, then REAL.
        static func affinity(_ declared: String) -> Affinity {
            let t = declared.uppercased()
            if t.contains("INT") { return .integer }
            if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") { return .text }
            if t.contains("BLOB") || t.isEmpty { return .blob }
            if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") { return .real }
            return .numeric
        }
    }

    /// One row's first change in this write.
    struct Row {
        var key: [UInt8]
        /// The row before the write (every column, serialized), or nil when it did not exist.
        var original: [UInt8]?
        var indirect: Bool
    }

    /// The rows of one table changed in this write, in the order first changed.
    struct Touched {
        let table: Table
        var rows: [Row] = []
        var index: [[UInt8]: Int] = [:]
    }

    let db: SQLiteConnection
    private var tables: [String: Table] = [:]
    private var cachedSchemaVersion: Int64?
    private var schemaVersion: PreparedStatement?
    private var touched: [Touched] = []
    private var active = false
    /// A change the capture could not take (a table it does not know, a NULL key, ...): a
    /// data write that made it must fail rather than be logged without it.
    private var problem: StoreError?
    /// Bytes of row images kept for this write, and the most it may keep: a write that
    /// changes more than its changeset could hold fails early instead of holding all of
    /// it in memory first.
    private var keptBytes = 0
    let byteLimit: Int
    /// Reused scratch buffers.
    private var scratchKey: [UInt8] = []
    /// The value SQLite 3.40's `sqlite3_preupdate_old` hands out for a column the stored
    /// row does not have (one added by ALTER TABLE ADD COLUMN after the row was written):
    /// a shared NULL, where a query reads the column's default. Taken as the old value, it
    /// would make the changeset's old image disagree with every replica's row (a conflict
    /// on the first UPDATE or DELETE of such a row). SQLite returns the same shared value
    /// for a column read from a statement that has no row, which is how it is found.
    private let missingColumn: UnsafeMutableRawPointer?
    /// Keeps the statement that showed `missingColumn`.
    private let probe: PreparedStatement?

    init(db: SQLiteConnection, byteLimit: Int = Int.max) {
        self.db = db
        self.byteLimit = byteLimit
        probe = try? db.prepare("SELECT 1")
        missingColumn = probe.flatMap { sqlite3_column_value($0.handle, 0) }.map { UnsafeMutableRawPointer($0) }
        sqlite3_preupdate_hook(db.handle, preupdateCallback, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit { sqlite3_preupdate_hook(db.handle, nil, nil) }

    /// Starts capturing one write. The column lists are read again when the schema
    /// version moved since they were read. The caller's authorizer allows internal SQL.
    func begin() throws(SQLiteError) {
        let stmt: PreparedStatement
        if let s = schemaVersion { stmt = s } else {
            stmt = try db.prepare("PRAGMA main.schema_version")
            schemaVersion = stmt
        }
        defer { sqlite3_reset(stmt.handle) }
        guard try stmt.step() else { throw SQLiteError(code: SQLITE_ERROR, extendedCode: SQLITE_ERROR, message: "PRAGMA schema_version returned no row") }
        let version = sqlite3_column_int64(stmt.handle, 0)
        if version != cachedSchemaVersion {
            try loadTables()
            cachedSchemaVersion = version
        }
        touched.removeAll(keepingCapacity: true)
        problem = nil
        keptBytes = 0
        active = true
    }

    /// Drops what was captured (a failed write, or a schema write logged as its SQL).
    func discard() {
        active = false
        touched.removeAll(keepingCapacity: true)
        problem = nil
        keptBytes = 0
    }

    /// The column lists must be read again before the next write (after a rollback, which
    /// may have restored an older schema under a version number already seen).
    func forgetSchema() {
        cachedSchemaVersion = nil
    }

    /// Ends the write: its changeset and the inverse changeset, both empty when nothing
    /// changed. The caller's authorizer allows internal SQL.
    func finish() throws(StoreError) -> (changeset: [UInt8], inverse: [UInt8]) {
        active = false
        defer { touched.removeAll(keepingCapacity: true) }
        if let problem { throw problem }
        return try encode()
    }

    private func encode() throws(StoreError) -> (changeset: [UInt8], inverse: [UInt8]) {
        var out: [UInt8] = []
        var inverse: [UInt8] = []
        for t in touched {
            let table = t.table
            let stmt: PreparedStatement
            if let s = table.readStatement { stmt = s } else {
                do { stmt = try db.prepare(table.readBack) } catch { throw .sqlite(error, statement: nil) }
                table.readStatement = stmt
            }
            let rewind = out.count
            let rewindInverse = inverse.count
            Self.appendTableHeader(table, to: &out)
            Self.appendTableHeader(table, to: &inverse)
            var wrote = false
            var current: [UInt8] = []
            for row in t.rows {
                current.removeAll(keepingCapacity: true)
                let exists: Bool
                do { exists = try read(row.key, table: table, with: stmt, into: &current) } catch { throw .sqlite(error, statement: nil) }
                let flag: UInt8 = row.indirect ? 1 : 0
                switch (row.original, exists) {
                case (nil, false):
                    continue
                case (nil, true):
                    out.append(contentsOf: [UInt8(SQLITE_INSERT), flag])
                    out.append(contentsOf: current)
                    inverse.append(contentsOf: [UInt8(SQLITE_DELETE), flag])
                    inverse.append(contentsOf: current)
                case (let original?, false):
                    out.append(contentsOf: [UInt8(SQLITE_DELETE), flag])
                    out.append(contentsOf: original)
                    inverse.append(contentsOf: [UInt8(SQLITE_INSERT), flag])
                    inverse.append(contentsOf: original)
                case (let original?, true):
                    guard Self.appendUpdate(table, before: original, after: current, flag: flag, to: &out, inverse: &inverse) else { continue }
                }
                wrote = true
                if out.count > byteLimit { throw .tooLarge(what: "the batch's changeset", size: out.count, limit: byteLimit) }
            }
            if !wrote {
                out.removeSubrange(rewind...)
                inverse.removeSubrange(rewindInverse...)
            }
        }
        return (out, inverse)
    }

    // MARK: The hook

    fileprivate func preupdate(op: Int32, database: UnsafePointer<CChar>?, table name: UnsafePointer<CChar>?) {
        guard active, problem == nil, let database, let name, strcmp(database, "main") == 0 else { return }
        guard let at = touchedIndex(name) else { return }
        let table = touched[at].table
        let indirect = sqlite3_preupdate_depth(db.handle) > 0
        switch op {
        case SQLITE_INSERT:
            note(at, keyFromNew: true, original: false, indirect: indirect)
        case SQLITE_DELETE:
            note(at, keyFromNew: false, original: true, indirect: indirect)
        case SQLITE_UPDATE:
            note(at, keyFromNew: false, original: true, indirect: indirect)
            // A changed primary key: the new key's row did not exist before this write
            // unless an earlier change in it already says otherwise.
            if !table.keyColumns.isEmpty { note(at, keyFromNew: true, original: false, indirect: indirect) }
        default:
            return
        }
    }

    /// The position in `touched` of the table named `name`, adding it on its first change;
    /// nil for a table not captured.
    private func touchedIndex(_ name: UnsafePointer<CChar>) -> Int? {
        let length = strlen(name)
        for i in touched.indices.reversed() {
            let bytes = touched[i].table.nameBytes
            guard bytes.count == length else { continue }
            if bytes.withUnsafeBufferPointer({ b in b.baseAddress.map { memcmp($0, name, length) == 0 } ?? (length == 0) }) { return i }
        }
        let key = String(cString: name)
        if key.hasPrefix("sqlite_") { return nil }
        guard let table = tables[key] else {
            // Created in this very write (a schema write, whose record is its SQL), or a
            // schema the capture has not read: fatal only to a data write.
            if problem == nil { problem = .refused("no column list for table \(key) (a table created in this write?)", statement: nil) }
            return nil
        }
        guard !table.keyColumns.isEmpty else { return nil }
        let count = Int(sqlite3_preupdate_count(db.handle))
        guard count == table.columnCount else {
            if problem == nil {
                problem = .refused("table \(key) has \(count) columns in its rows but \(table.columnCount) in its column list (generated columns?): its changes cannot be replicated", statement: nil)
            }
            return nil
        }
        touched.append(Touched(table: table))
        return touched.count - 1
    }

    private func note(_ at: Int, keyFromNew: Bool, original keepOriginal: Bool, indirect: Bool) {
        let table = touched[at].table
        scratchKey.removeAll(keepingCapacity: true)
        for c in table.keyColumns {
            var v: OpaquePointer?
            let rc = keyFromNew ? sqlite3_preupdate_new(db.handle, Int32(c), &v) : sqlite3_preupdate_old(db.handle, Int32(c), &v)
            guard rc == SQLITE_OK else {
                if problem == nil { problem = .sqlite(SQLiteError(code: rc, extendedCode: rc, message: "cannot read the changed row of \(table.name)"), statement: nil) }
                return
            }
            // A NULL in the key: SQLite allows one in a non-integer primary key of an
            // ordinary table, but no replica could find such a row again.
            if sqlite3_value_type(v) == SQLITE_NULL {
                if problem == nil {
                    problem = .refused("table \(table.name): a row with NULL in its primary key cannot be replicated; declare the key NOT NULL", statement: nil)
                }
                return
            }
            Self.appendValue(v, real: table.real[c], to: &scratchKey)
        }
        if let existing = touched[at].index[scratchKey] {
            if !indirect { touched[at].rows[existing].indirect = false }
            return
        }
        var original: [UInt8]?
        if keepOriginal {
            var image: [UInt8] = []
            for c in 0..<table.columnCount {
                var v: OpaquePointer?
                let rc = sqlite3_preupdate_old(db.handle, Int32(c), &v)
                guard rc == SQLITE_OK else {
                    if problem == nil { problem = .sqlite(SQLiteError(code: rc, extendedCode: rc, message: "cannot read the old row of \(table.name)"), statement: nil) }
                    return
                }
                if let v, UnsafeMutableRawPointer(v) == missingColumn {
                    // Not stored in this row: the column's default is its value.
                    guard let value = table.defaults[c] else {
                        if problem == nil { problem = .refused("cannot read column \(c + 1) of an old row of \(table.name): it is not stored, and its default's stored form is not known", statement: nil) }
                        return
                    }
                    image.append(contentsOf: value)
                    continue
                }
                Self.appendValue(v, real: table.real[c], to: &image)
            }
            original = image
        }
        keptBytes += scratchKey.count + (original?.count ?? 0)
        if keptBytes > byteLimit, problem == nil {
            problem = .tooLarge(what: "the rows this write changes", size: keptBytes, limit: byteLimit)
        }
        touched[at].index[scratchKey] = touched[at].rows.count
        touched[at].rows.append(Row(key: scratchKey, original: original, indirect: indirect))
    }

    // MARK: Reading

    private func loadTables() throws(SQLiteError) {
        let rows = try db.rows("""
            SELECT m.name, p.name, p.type, p.pk, p.dflt_value FROM sqlite_schema AS m, pragma_table_info(m.name) AS p
            WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY m.name, p.cid
            """)
        var columns: [String: [Table.Column]] = [:]
        for r in rows {
            guard case let .text(table) = r[0], case let .text(column) = r[1], case let .integer(pk) = r[3] else { continue }
            var type = ""
            if case let .text(t) = r[2] { type = t }
            var defaultSQL: String?
            if case let .text(d) = r[4] { defaultSQL = d }
            columns[table, default: []].append((column, type, Int(pk), defaultSQL))
        }
        tables = [:]
        for (name, list) in columns {
            let table = Table(name: name, columns: list)
            for (c, column) in list.enumerated() {
                guard let expression = column.defaultSQL else { continue }
                table.defaults[c] = defaultValue(expression, affinity: Table.affinity(column.type))
            }
            tables[name] = table
        }
    }

    /// The value a query reads for a column added by ALTER TABLE (whose default SQLite
    /// requires to be constant) from a row stored before it, serialized: the default with
    /// the column's affinity applied. nil when that cannot be worked out here (text that
    /// an INTEGER or NUMERIC column might turn into a number); a write meeting such a
    /// row then fails rather than log a wrong old image.
    private func defaultValue(_ expression: String, affinity: Table.Affinity) -> [UInt8]? {
        guard let stmt = try? db.prepare("SELECT (\(expression)), CAST((\(expression)) AS TEXT)"), stmt.columnCount == 2,
              (try? stmt.step()) == true else { return nil }
        let type = sqlite3_column_type(stmt.handle, 0)
        var out: [UInt8] = []
        switch (affinity, type) {
        case (.text, SQLITE_INTEGER), (.text, SQLITE_FLOAT):
            // A number in a TEXT column is stored as its text, as CAST writes it.
            Self.appendValue(sqlite3_column_value(stmt.handle, 1), real: false, to: &out)
        case (.integer, SQLITE_TEXT), (.numeric, SQLITE_TEXT), (.real, SQLITE_TEXT):
            return nil
        case (.integer, SQLITE_FLOAT), (.numeric, SQLITE_FLOAT):
            // A whole number is stored as an integer there.
            let d = sqlite3_column_double(stmt.handle, 0)
            if d == d.rounded(), abs(d) < 9.0e18 {
                out.append(UInt8(SQLITE_INTEGER))
                Self.appendBigEndian(UInt64(bitPattern: Int64(d)), to: &out)
            } else {
                Self.appendValue(sqlite3_column_value(stmt.handle, 0), real: false, to: &out)
            }
        default:
            Self.appendValue(sqlite3_column_value(stmt.handle, 0), real: affinity == .real, to: &out)
        }
        return out
    }

    /// Reads the row with `key` now; appends its serialized columns to `image` when it exists.
    private func read(_ key: [UInt8], table: Table, with stmt: PreparedStatement, into image: inout [UInt8]) throws(SQLiteError) -> Bool {
        sqlite3_reset(stmt.handle)
        var rc: Int32 = SQLITE_OK
        key.withUnsafeBytes { k in
            var at = 0
            for i in 0..<table.keyColumns.count where rc == SQLITE_OK {
                rc = Self.bind(k, at: &at, to: stmt.handle, index: Int32(i + 1))
            }
        }
        try db.check(rc)
        defer { sqlite3_reset(stmt.handle) }
        guard try stmt.step() else { return false }
        guard stmt.columnCount == table.columnCount else {
            throw SQLiteError(code: SQLITE_SCHEMA, extendedCode: SQLITE_SCHEMA,
                              message: "table \(table.name) has \(stmt.columnCount) columns, \(table.columnCount) expected")
        }
        for c in 0..<table.columnCount {
            Self.appendValue(sqlite3_column_value(stmt.handle, Int32(c)), real: table.real[c], to: &image)
        }
        return true
    }

    // MARK: The changeset format

    /// 'T', the column count, each column's position in the primary key, the name and a NUL.
    static func appendTableHeader(_ table: Table, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "T"))
        appendVarint(UInt64(table.columnCount), to: &out)
        out.append(contentsOf: table.keyPositions)
        out.append(contentsOf: table.nameBytes)
        out.append(0)
    }

    /// An UPDATE and its inverse; false when no column changed. The UPDATE's old image
    /// holds the key and the changed columns' old values, its new image the changed
    /// columns' new values; the rest are "undefined" (0). The inverse swaps them, the key
    /// staying in the old image (as `sqlite3changeset_invert` writes it).
    static func appendUpdate(_ table: Table, before: [UInt8], after: [UInt8], flag: UInt8,
                             to out: inout [UInt8], inverse: inout [UInt8]) -> Bool {
        var b = before.startIndex, a = after.startIndex
        var spans: [(before: Range<Int>, after: Range<Int>, changed: Bool, inKey: Bool)] = []
        spans.reserveCapacity(table.columnCount)
        var any = false
        for c in 0..<table.columnCount {
            let bs = b..<(b + valueLength(before, at: b))
            let as_ = a..<(a + valueLength(after, at: a))
            let changed = !sameValue(before[bs], after[as_])
            any = any || changed
            spans.append((bs, as_, changed, table.keyPositions[c] > 0))
            b = bs.upperBound
            a = as_.upperBound
        }
        guard any else { return false }
        out.append(contentsOf: [UInt8(SQLITE_UPDATE), flag])
        for s in spans {
            if s.changed || s.inKey { out.append(contentsOf: before[s.before]) } else { out.append(0) }
        }
        for s in spans {
            if s.changed { out.append(contentsOf: after[s.after]) } else { out.append(0) }
        }
        inverse.append(contentsOf: [UInt8(SQLITE_UPDATE), flag])
        for s in spans {
            if s.inKey { inverse.append(contentsOf: before[s.before]) } else if s.changed { inverse.append(contentsOf: after[s.after]) } else { inverse.append(0) }
        }
        for s in spans {
            if !s.inKey && s.changed { inverse.append(contentsOf: before[s.before]) } else { inverse.append(0) }
        }
        return true
    }

    /// Equal as the session extension compares them: same type, and equal integers,
    /// numerically equal floats, or identical bytes.
    static func sameValue(_ x: ArraySlice<UInt8>, _ y: ArraySlice<UInt8>) -> Bool {
        guard let tx = x.first, let ty = y.first, tx == ty else { return false }
        if tx == UInt8(SQLITE_FLOAT) {
            return Double(bitPattern: bigEndian(x.dropFirst())) == Double(bitPattern: bigEndian(y.dropFirst()))
        }
        return x.elementsEqual(y)
    }

    private static func bigEndian(_ s: ArraySlice<UInt8>) -> UInt64 {
        var v: UInt64 = 0
        for byte in s.prefix(8) { v = v << 8 | UInt64(byte) }
        return v
    }

    /// Bytes taken by the serialized value at `at` (its type byte included).
    static func valueLength(_ buf: [UInt8], at: Int) -> Int {
        switch Int32(buf[at]) {
        case SQLITE_INTEGER, SQLITE_FLOAT: return 9
        case SQLITE_TEXT, SQLITE_BLOB:
            let (n, used) = readVarint(buf, at: at + 1)
            return 1 + used + Int(n)
        default: return 1  // NULL, or undefined (0)
        }
    }

    /// A value as the session extension serializes it: its type, then 8 big-endian bytes
    /// for an integer or a float, or a varint length and the bytes for text and blobs.
    static func appendValue(_ v: OpaquePointer?, real: Bool, to out: inout [UInt8]) {
        let type = sqlite3_value_type(v)
        switch type {
        case SQLITE_INTEGER:
            if real {
                out.append(UInt8(SQLITE_FLOAT))
                appendBigEndian(Double(sqlite3_value_int64(v)).bitPattern, to: &out)
            } else {
                out.append(UInt8(SQLITE_INTEGER))
                appendBigEndian(UInt64(bitPattern: sqlite3_value_int64(v)), to: &out)
            }
        case SQLITE_FLOAT:
            out.append(UInt8(SQLITE_FLOAT))
            appendBigEndian(sqlite3_value_double(v).bitPattern, to: &out)
        case SQLITE_TEXT, SQLITE_BLOB:
            // The pointer before the length, as SQLite asks (reading it may convert the value).
            let p = type == SQLITE_TEXT ? sqlite3_value_text(v).map { UnsafeRawPointer($0) } : sqlite3_value_blob(v)
            let n = Int(sqlite3_value_bytes(v))
            out.append(UInt8(type))
            appendVarint(UInt64(n), to: &out)
            if n > 0, let p { out.append(contentsOf: UnsafeRawBufferPointer(start: p, count: n)) }
        default:
            out.append(UInt8(SQLITE_NULL))
        }
    }

    /// Binds the serialized value at `at` of `key` as parameter `index`, advancing `at`.
    private static func bind(_ key: UnsafeRawBufferPointer, at: inout Int, to stmt: OpaquePointer, index: Int32) -> Int32 {
        let type = Int32(key[at])
        at += 1
        switch type {
        case SQLITE_INTEGER, SQLITE_FLOAT:
            var v: UInt64 = 0
            for i in 0..<8 { v = v << 8 | UInt64(key[at + i]) }
            at += 8
            return type == SQLITE_INTEGER ? sqlite3_bind_int64(stmt, index, Int64(bitPattern: v))
                : sqlite3_bind_double(stmt, index, Double(bitPattern: v))
        case SQLITE_TEXT, SQLITE_BLOB:
            let (n, used) = readVarint(key, at: at)
            at += used
            let p = key.baseAddress.map { $0 + at }
            at += Int(n)
            if type == SQLITE_TEXT {
                return sqlite3_bind_text64(stmt, index, p?.assumingMemoryBound(to: CChar.self), n, tandem_sqlite_transient(), UInt8(SQLITE_UTF8))
            }
            return n == 0 ? sqlite3_bind_zeroblob(stmt, index, 0) : sqlite3_bind_blob64(stmt, index, p, n, tandem_sqlite_transient())
        default:
            return sqlite3_bind_null(stmt, index)
        }
    }

    static func appendBigEndian(_ v: UInt64, to out: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }

    /// SQLite's varint: big-endian groups of 7 bits, the high bit set on all but the last
    /// (lengths here stay far below the 9-byte form's 2^56).
    static func appendVarint(_ v: UInt64, to out: inout [UInt8]) {
        if v <= 0x7f {
            out.append(UInt8(v))
            return
        }
        var groups: [UInt8] = []
        var x = v
        while x != 0 {
            groups.append(UInt8(x & 0x7f) | 0x80)
            x >>= 7
        }
        groups[0] &= 0x7f
        out.append(contentsOf: groups.reversed())
    }

    static func readVarint<Bytes: Collection<UInt8>>(_ buf: Bytes, at: Int) -> (value: UInt64, bytes: Int) where Bytes.Index == Int {
        var v: UInt64 = 0
        var used = 0
        while at + used < buf.count && used < 9 {
            let byte = buf[at + used]
            v = v << 7 | UInt64(byte & 0x7f)
            used += 1
            if byte & 0x80 == 0 { break }
        }
        return (v, used)
    }
}

/// SQLite calls this before each row change on the connection; the context is the
/// connection's `ChangesetCapture`.
private func preupdateCallback(_ context: UnsafeMutableRawPointer?, _ db: OpaquePointer?, _ op: Int32,
                               _ database: UnsafePointer<CChar>?, _ table: UnsafePointer<CChar>?,
                               _ key1: sqlite3_int64, _ key2: sqlite3_int64) {
    guard let context else { return }
    Unmanaged<ChangesetCapture>.fromOpaque(context).takeUnretainedValue().preupdate(op: op, database: database, table: table)
}
