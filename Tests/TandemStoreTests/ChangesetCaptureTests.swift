import CSQLite
import Foundation
import Testing
import TandemModel
@testable import TandemStore

/// The capture must write what SQLite's session extension would: the same changes (op,
/// indirect flag, old and new images) for every write, an inverse equal to
/// `sqlite3changeset_invert` of it, and a changeset that rebuilds the database on a
/// replica. Checked by running the same random writes on two databases, one captured and
/// one under a session.
@Suite("Changeset capture")
struct ChangesetCaptureTests {
    static let schema = """
        PRAGMA foreign_keys = ON;
        CREATE TABLE t1 (id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB);
        CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL);
        CREATE TABLE t3 (a TEXT, b INTEGER, v TEXT, PRIMARY KEY (b, a)) WITHOUT ROWID;
        CREATE TABLE t4 (a TEXT, b INTEGER, v TEXT, PRIMARY KEY (a, b));
        CREATE TABLE parent (id INTEGER PRIMARY KEY, label TEXT);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id) ON DELETE CASCADE ON UPDATE CASCADE, note TEXT);
        CREATE TABLE nopk (a, b);
        """

    /// One change as SQLite's own iterator reads it, values spelled out ("-" undefined).
    struct Change: Hashable, Comparable, CustomStringConvertible {
        var table: String
        var op: Int32
        var indirect: Bool
        var old: [String]
        var new: [String]
        var description: String { "\(table) op \(op)\(indirect ? " indirect" : "") old \(old) new \(new)" }
        static func < (a: Change, b: Change) -> Bool { a.description < b.description }
    }

    /// The changes of a changeset, and the order its tables come in.
    static func read(_ changeset: [UInt8]) throws -> (tables: [String], changes: [Change]) {
        guard !changeset.isEmpty else { return ([], []) }
        var iter: OpaquePointer?
        var copy = changeset
        let rc = copy.withUnsafeMutableBytes { sqlite3changeset_start(&iter, Int32($0.count), $0.baseAddress) }
        try #require(rc == SQLITE_OK)
        defer { sqlite3changeset_finalize(iter) }
        var tables: [String] = []
        var changes: [Change] = []
        func spell(_ v: OpaquePointer?) -> String {
            guard let v else { return "-" }
            switch sqlite3_value_type(v) {
            case SQLITE_INTEGER: return "i\(sqlite3_value_int64(v))"
            case SQLITE_FLOAT: return "f\(sqlite3_value_double(v))"
            case SQLITE_TEXT: return "t" + String(cString: sqlite3_value_text(v))
            case SQLITE_BLOB:
                let n = Int(sqlite3_value_bytes(v))
                guard n > 0, let p = sqlite3_value_blob(v) else { return "b" }
                return "b" + [UInt8](UnsafeRawBufferPointer(start: p, count: n)).map { String($0, radix: 16) }.joined()
            default: return "n"
            }
        }
        while sqlite3changeset_next(iter) == SQLITE_ROW {
            var name: UnsafePointer<CChar>?
            var columns: Int32 = 0
            var op: Int32 = 0
            var indirect: Int32 = 0
            try #require(sqlite3changeset_op(iter, &name, &columns, &op, &indirect) == SQLITE_OK)
            // A table's header: its name and its primary key's columns, as the applying
            // side compares them with its own.
            var pk: UnsafeMutablePointer<UInt8>?
            var pkColumns: Int32 = 0
            try #require(sqlite3changeset_pk(iter, &pk, &pkColumns) == SQLITE_OK)
            let key = pk.map { Array(UnsafeBufferPointer(start: $0, count: Int(pkColumns))) } ?? []
            let table = (name.map { String(cString: $0) } ?? "?") + " \(key)"
            if tables.last != table { tables.append(table) }
            var old: [String] = []
            var new: [String] = []
            for c in 0..<columns {
                var v: OpaquePointer?
                if op != SQLITE_INSERT {
                    _ = sqlite3changeset_old(iter, c, &v)
                    old.append(spell(v))
                }
                v = nil
                if op != SQLITE_DELETE {
                    _ = sqlite3changeset_new(iter, c, &v)
                    new.append(spell(v))
                }
            }
            changes.append(Change(table: table, op: op, indirect: indirect != 0, old: old, new: new))
        }
        return (tables, changes.sorted())
    }

    static func invert(_ changeset: [UInt8]) throws -> [UInt8] {
        guard !changeset.isEmpty else { return [] }
        var n: Int32 = 0
        var p: UnsafeMutableRawPointer?
        let rc = changeset.withUnsafeBytes { sqlite3changeset_invert(Int32($0.count), $0.baseAddress, &n, &p) }
        defer { sqlite3_free(p) }
        try #require(rc == SQLITE_OK)
        guard let p else { return [] }
        return [UInt8](UnsafeRawBufferPointer(start: p, count: Int(n)))
    }

    /// Every row of every table, in key order: what a database holds.
    static func dump(_ db: SQLiteConnection) throws -> [String] {
        var out: [String] = []
        for table in ["t1", "t2", "t3", "t4", "parent", "child"] {
            for row in try db.rows("SELECT * FROM \(table) ORDER BY 1, 2") { out.append("\(table) \(row)") }
        }
        return out
    }

    /// A random statement over the test tables; values small, so that statements in one
    /// write meet the same rows again (insert then update, delete then insert, key moves).
    static func statement(_ r: inout SeededRandom) -> SQLStatement {
        func id() -> Int64 { Int64(r.next() % 12) }
        func code() -> String { ["a", "b", "c", "d", "e", "f"][Int(r.next() % 6)] }
        func text() -> SQLValue { r.chance(0.15) ? .null : .text(["x", "y", "zz", "", "éé"][Int(r.next() % 5)]) }
        func number() -> SQLValue {
            switch r.next() % 4 {
            case 0: .null
            case 1: .integer(Int64(r.next() % 5))  // an integer in a REAL column
            case 2: .real(Double(r.next() % 5) / 2)
            default: .real(Double(r.next() % 3))
            }
        }
        func blob() -> SQLValue { r.chance(0.2) ? .null : .blob((0..<Int(r.next() % 4)).map { _ in UInt8(r.next() % 256) }) }
        switch r.next() % 22 {
        case 0: return SQLStatement("INSERT OR REPLACE INTO t1 VALUES (?, ?, ?, ?)", [.integer(id()), text(), number(), blob()])
        case 1: return SQLStatement("INSERT OR IGNORE INTO t1 (id, name) VALUES (?, ?)", [.integer(id()), text()])
        case 2: return SQLStatement("UPDATE t1 SET name = ?, score = ? WHERE id = ?", [text(), number(), .integer(id())])
        case 3: return SQLStatement("UPDATE OR IGNORE t1 SET id = ? WHERE id = ?", [.integer(id()), .integer(id())])
        case 4: return SQLStatement("DELETE FROM t1 WHERE id = ?", [.integer(id())])
        case 5: return SQLStatement("UPDATE t1 SET score = score, name = name WHERE id % 2 = ?", [.integer(id() % 2)])
        case 6: return SQLStatement("INSERT OR REPLACE INTO t2 VALUES (?, ?, ?)", [.text(code()), .integer(id()), number()])
        case 7: return SQLStatement("UPDATE OR IGNORE t2 SET code = ? WHERE code = ?", [.text(code()), .text(code())])
        case 8: return SQLStatement("UPDATE t2 SET x = ?, n = n + 1 WHERE code = ?", [number(), .text(code())])
        case 9: return SQLStatement("DELETE FROM t2 WHERE n % 3 = ?", [.integer(id() % 3)])
        case 10: return SQLStatement("INSERT OR REPLACE INTO t3 VALUES (?, ?, ?)", [.text(code()), .integer(id() % 3), text()])
        case 11: return SQLStatement("UPDATE OR IGNORE t3 SET b = ?, v = ? WHERE a = ?", [.integer(id() % 3), text(), .text(code())])
        case 12: return SQLStatement("DELETE FROM t3 WHERE a = ? AND b = ?", [.text(code()), .integer(id() % 3)])
        case 13: return SQLStatement("INSERT OR REPLACE INTO parent VALUES (?, ?)", [.integer(id() % 4), text()])
        case 14: return SQLStatement("INSERT OR IGNORE INTO child SELECT ?, id, ? FROM parent WHERE id = ?", [.integer(id()), text(), .integer(id() % 4)])
        case 15: return SQLStatement("DELETE FROM parent WHERE id = ?", [.integer(id() % 4)])  // cascades: indirect deletes
        case 16: return SQLStatement("UPDATE OR IGNORE parent SET id = ? WHERE id = ?", [.integer(id() % 6), .integer(id() % 4)])  // cascades: indirect updates
        case 17: return SQLStatement("INSERT INTO nopk VALUES (?, ?)", [.integer(id()), text()])
        case 18: return SQLStatement("INSERT OR REPLACE INTO t4 VALUES (?, ?, ?)", [.text(code()), .integer(id() % 3), text()])
        case 19: return SQLStatement("UPDATE OR IGNORE t4 SET b = ?, v = ? WHERE a = ?", [.integer(id() % 3), text(), .text(code())])
        case 20: return SQLStatement("DELETE FROM t4 WHERE a = ? OR b = ?", [.text(code()), .integer(id() % 3)])
        default: return SQLStatement("UPDATE child SET note = ? WHERE parent_id = ?", [text(), .integer(id() % 4)])
        }
    }

    static func run(_ s: SQLStatement, on db: SQLiteConnection) throws {
        let stmt = try db.prepare(s.sql)
        try stmt.bind(s.params)
        while try stmt.step() {}
    }

    @Test("random writes: the same changes as the session extension, its inverse, and a replica that ends equal",
          arguments: [UInt64(1), 2, 3, 4])
    func matchesSessionExtension(seed: UInt64) throws {
        let dir = TempDir("capture")
        defer { dir.cleanup() }
        let captured = try SQLiteConnection(path: dir.sub("captured.sqlite"), create: true)
        let sessioned = try SQLiteConnection(path: dir.sub("sessioned.sqlite"), create: true)
        let replica = try SQLiteConnection(path: dir.sub("replica.sqlite"), create: true)
        // A second replica applies with the store's own applier (statements kept
        // prepared), the first with sqlite3changeset_apply: both must end equal.
        let applied = try SQLiteConnection(path: dir.sub("applied.sqlite"), create: true)
        for db in [captured, sessioned, replica, applied] { try db.exec(Self.schema) }
        // The changeset already holds what the primary's foreign key actions did; the
        // replica must not do it again (as the store applies changesets).
        try replica.exec("PRAGMA foreign_keys = OFF")
        try applied.exec("PRAGMA foreign_keys = OFF")
        let applier = ChangesetApplier(db: applied)
        var undone = 0
        let capture = ChangesetCapture(db: captured)
        var random = SeededRandom(seed: seed)
        var compared = 0, updates = 0, indirect = 0, moved = 0
        for _ in 0..<300 {
            let statements = (0..<(1 + Int(random.next() % 5))).map { _ in Self.statement(&random) }
            try captured.exec("BEGIN")
            try sessioned.exec("BEGIN")
            try capture.begin()
            var session: OpaquePointer?
            try #require(sqlite3session_create(sessioned.handle, "main", &session) == SQLITE_OK)
            defer { sqlite3session_delete(session) }
            try #require(sqlite3session_attach(session, nil) == SQLITE_OK)
            var failed = false
            for s in statements {
                let okA = (try? Self.run(s, on: captured)) != nil
                let okB = (try? Self.run(s, on: sessioned)) != nil
                #expect(okA == okB, "\(s.sql) \(s.params)")
                if !okA || !okB { failed = true; break }
            }
            if failed {
                capture.discard()
                try captured.exec("ROLLBACK")
                try sessioned.exec("ROLLBACK")
                continue
            }
            let ours = try capture.finish()
            var n: Int32 = 0
            var p: UnsafeMutableRawPointer?
            try #require(sqlite3session_changeset(session, &n, &p) == SQLITE_OK)
            let theirs = p.map { [UInt8](UnsafeRawBufferPointer(start: $0, count: Int(n))) } ?? []
            sqlite3_free(p)
            try captured.exec("COMMIT")
            try sessioned.exec("COMMIT")

            let a = try Self.read(ours.changeset)
            let b = try Self.read(theirs)
            #expect(a.changes == b.changes, "statements: \(statements.map(\.sql))")
            #expect(a.tables == b.tables)
            #expect(ours.inverse == (try Self.invert(ours.changeset)))
            compared += 1
            updates += a.changes.filter { $0.op == SQLITE_UPDATE }.count
            indirect += a.changes.filter(\.indirect).count
            moved += statements.filter { $0.sql.contains("SET id =") || $0.sql.contains("SET code =") }.count

            if !ours.changeset.isEmpty {
                var conflict: Int32 = 0
                let rc = ours.changeset.withUnsafeBytes { cs in
                    withUnsafeMutablePointer(to: &conflict) { box in
                        sqlite3changeset_apply(replica.handle, Int32(cs.count), UnsafeMutableRawPointer(mutating: cs.baseAddress), nil,
                                               { ctx, kind, _ in
                                                   ctx?.assumingMemoryBound(to: Int32.self).pointee = kind
                                                   return SQLITE_CHANGESET_ABORT
                                               }, box)
                    }
                }
                #expect(rc == SQLITE_OK, "apply: \(rc), conflict kind \(conflict), changes \(a.changes)")
                try applied.exec("BEGIN")
                try ours.changeset.withUnsafeBytes { try applier.apply($0) }
                // Now and then undo it with its inverse and apply it again, as a deposed
                // primary's rollback does: the inverse's updates, deletes and inserts.
                if compared % 5 == 0 {
                    try ours.inverse.withUnsafeBytes { try applier.apply($0) }
                    try ours.changeset.withUnsafeBytes { try applier.apply($0) }
                    undone += 1
                }
                try applied.exec("COMMIT")
            }
            let kept = try Self.dump(applied)
            #expect(kept == (try Self.dump(replica)), "the store's applier and sqlite3changeset_apply disagree after \(a.changes)")
            let r = try Self.dump(replica), c = try Self.dump(captured)
            #expect(r == c, "after \(statements.map { "\($0.sql) \($0.params)" }): replica only \(Set(r).subtracting(c)), primary only \(Set(c).subtracting(r)), changes \(a.changes)")
            if r != c { return }
        }
        // The random writes did reach the cases that matter.
        #expect(compared > 200)
        #expect(updates > 50)
        #expect(indirect > 5)
        #expect(moved > 20)
        #expect(undone > 20)
    }

    @Test("the comparison notices a changed value, a lost change and a flipped indirect flag")
    func comparisonCatchesDifferences() throws {
        let dir = TempDir("capture-check")
        defer { dir.cleanup() }
        let db = try SQLiteConnection(path: dir.sub("db.sqlite"), create: true)
        try db.exec(Self.schema)
        try db.exec("INSERT INTO parent VALUES (1, 'p'); INSERT INTO child VALUES (1, 1, 'c'), (2, 1, 'd')")
        let capture = ChangesetCapture(db: db)
        try capture.begin()
        try db.exec("INSERT INTO t1 VALUES (7, 'seven', 1.5, x'00'); DELETE FROM parent WHERE id = 1")
        let good = try capture.finish().changeset
        let reference = try Self.read(good)
        #expect(reference.changes.count == 4)  // the insert, the parent's delete, two cascaded deletes
        #expect(reference.changes.filter(\.indirect).count == 2)

        // A changed byte in the text 'seven'.
        var changedValue = good
        let at = try #require(good.firstRange(of: Array("seven".utf8))).lowerBound
        changedValue[at] = UInt8(ascii: "S")
        #expect(try Self.read(changedValue).changes != reference.changes)
        // The indirect flag of the last change: a child row's cascaded delete, 23 bytes
        // (op, flag, two integers of 9 bytes, a one-letter text of 3).
        try #require(good[good.count - 23] == UInt8(SQLITE_DELETE) && good[good.count - 22] == 1)
        var flipped = good
        flipped[good.count - 22] = 0
        #expect(try Self.read(flipped).changes != reference.changes)
        // A changeset missing that last change.
        let shorter = try Self.read(Array(good.dropLast(23)))
        #expect(shorter.changes.count == 3)
        #expect(shorter.changes != reference.changes)
    }

    @Test("an application's own foreign key actions (ON DELETE CASCADE, ON UPDATE CASCADE, ON DELETE SET NULL) replicate, and undo, without running twice")
    func foreignKeyActionsReplicate() throws {
        let dir = TempDir("capture-fk")
        defer { dir.cleanup() }
        let log = try LoggedPrimary(dir.sub("p"))
        let primary = log.store
        func run(_ sql: String...) throws { try log.run(sql) }
        try run("CREATE TABLE clinics (id INTEGER PRIMARY KEY, name TEXT)",
                "CREATE TABLE rooms (id INTEGER PRIMARY KEY, clinic_id INTEGER REFERENCES clinics (id) ON DELETE CASCADE ON UPDATE CASCADE, label TEXT)",
                "CREATE TABLE devices (id INTEGER PRIMARY KEY, room_id INTEGER REFERENCES rooms (id) ON DELETE SET NULL, serial TEXT)")
        try run("INSERT INTO clinics VALUES (1, 'Strasbourg'), (2, 'Colmar')",
                "INSERT INTO rooms VALUES (10, 1, 'A'), (11, 1, 'B'), (12, 2, 'C')",
                "INSERT INTO devices VALUES (100, 10, 'cam-1'), (101, 12, 'cam-2')")
        let beforeCascade = try primary.stateHash()
        primary.markCommitted(through: primary.appliedLSN)
        let committed = primary.appliedLSN
        // A delete that cascades to two rooms and sets a device's room to NULL, and a key
        // change that cascades to a room.
        try run("DELETE FROM clinics WHERE id = 1")
        try run("UPDATE clinics SET id = 20 WHERE id = 2")
        #expect(try primary.query(SQLStatement("SELECT count(*) FROM rooms")).rows == [[.integer(1)]])
        #expect(try primary.query(SQLStatement("SELECT room_id FROM devices WHERE id = 100")).rows == [[.null]])
        #expect(try primary.query(SQLStatement("SELECT clinic_id FROM rooms WHERE id = 12")).rows == [[.integer(20)]])

        // A replica applying the log in one call, and one applying it record by record.
        for (name, perRecord) in [("batch", false), ("single", true)] {
            let replica = try StateStore.create(directory: dir.sub(name), clusterID: cluster)
            if perRecord { for r in log.records { try replica.apply([r]) } } else { try replica.apply(log.records) }
            #expect(replica.appliedLSN == primary.appliedLSN)
            #expect(try replica.stateHash() == primary.stateHash())
        }
        // The primary undoes the two uncommitted writes: every cascaded row comes back.
        try primary.rollback(to: committed)
        #expect(try primary.stateHash() == beforeCascade)
        #expect(try primary.query(SQLStatement("SELECT count(*) FROM rooms")).rows == [[.integer(3)]])
        // And writes still enforce foreign keys afterwards.
        #expect(throws: StoreError.self) {
            try primary.execute(WriteBatch([SQLStatement("INSERT INTO rooms VALUES (13, 99, 'D')")]), lsn: primary.appliedLSN.next, term: Term(1))
        }
    }

    @Test("an application's trigger runs once, on the primary; ANALYZE is logged as a statement; a NULL key is refused")
    func triggersAnalyzeAndNullKeys() throws {
        let dir = TempDir("capture-trigger")
        defer { dir.cleanup() }
        let log = try LoggedPrimary(dir.sub("p"))
        let primary = log.store
        func run(_ sql: String...) throws { try log.run(sql) }
        try run("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
                "CREATE TABLE audit (id INTEGER PRIMARY KEY, note_id INTEGER, action TEXT)",
                "CREATE TRIGGER notes_audit AFTER INSERT ON notes BEGIN INSERT INTO audit (note_id, action) VALUES (new.id, 'insert'); END",
                "CREATE INDEX notes_body ON notes (body)")
        try run("INSERT INTO notes VALUES (1, 'a'), (2, 'b')")
        let analyze = try primary.execute(WriteBatch([SQLStatement("ANALYZE")]), lsn: primary.appliedLSN.next, term: Term(1))
        #expect(analyze.record.kind == .schema)
        log.records.append(analyze.record)
        #expect(try primary.query(SQLStatement("SELECT count(*) FROM audit")).rows == [[.integer(2)]])

        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica.apply(log.records)
        #expect(try replica.stateHash() == primary.stateHash())
        // Once per note, not twice (the trigger again on the replica).
        #expect(try replica.query(SQLStatement("SELECT count(*) FROM audit")).rows == [[.integer(2)]])
        // Tandem's own tables differ by design (the primary keeps undo rows a replica
        // does not have); the replicated ones must not.
        let stats = "SELECT tbl, idx, stat FROM sqlite_stat1 WHERE tbl NOT LIKE 'tandem%' ORDER BY tbl, idx"
        #expect(try replica.query(SQLStatement(stats)).rows == (try primary.query(SQLStatement(stats))).rows)
        #expect(try !replica.query(SQLStatement(stats)).rows.isEmpty)

        try run("CREATE TABLE codes (code TEXT PRIMARY KEY, label TEXT)")
        #expect {
            try primary.execute(WriteBatch([SQLStatement("INSERT INTO codes VALUES (NULL, 'x')")]), lsn: primary.appliedLSN.next, term: Term(1))
        } throws: { "\($0)".contains("NULL in its primary key") }
    }

    @Test("rows written before ALTER TABLE ADD COLUMN ... DEFAULT are updated and deleted on replicas without a conflict")
    func addedColumnsWithDefaults() throws {
        let dir = TempDir("capture-alter")
        defer { dir.cleanup() }
        let log = try LoggedPrimary(dir.sub("p"))
        let primary = log.store
        func run(_ sql: String...) throws { try log.run(sql) }
        try run("CREATE TABLE rooms (id INTEGER PRIMARY KEY, label TEXT)")
        try run("INSERT INTO rooms (id, label) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        // Stored rows lack these columns; a query reads their defaults.
        try run("ALTER TABLE rooms ADD COLUMN beds INTEGER DEFAULT 2",
                "ALTER TABLE rooms ADD COLUMN floor TEXT DEFAULT 5",
                "ALTER TABLE rooms ADD COLUMN area REAL DEFAULT 12",
                "ALTER TABLE rooms ADD COLUMN wing DEFAULT 'north'",
                "ALTER TABLE rooms ADD COLUMN note TEXT")
        try run("UPDATE rooms SET label = 'A' WHERE id = 1")
        try run("DELETE FROM rooms WHERE id = 2")
        try run("UPDATE rooms SET beds = 4 WHERE id = 3")
        #expect(try primary.query(SQLStatement("SELECT beds, floor, area, wing, note FROM rooms WHERE id = 1")).rows
                == [[.integer(2), .text("5"), .real(12), .text("north"), .null]])

        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        for r in log.records { try replica.apply([r]) }
        #expect(try replica.stateHash() == primary.stateHash())
        // And the primary can undo them: the inverse of the delete puts the row back whole.
        let undoTo = primary.appliedLSN
        try run("DELETE FROM rooms WHERE id = 1")
        let before = try replica.stateHash()
        try primary.rollback(to: undoTo)
        #expect(try primary.stateHash() == before)
    }

    @Test("a write changing more than its changeset may hold fails with too_large, early for updates, and changes nothing")
    func changesetLimit() throws {
        let dir = TempDir("capture-limit")
        defer { dir.cleanup() }
        var limits = StoreLimits()
        limits.maxChangesetBytes = 4 << 10
        let store = try StateStore.create(directory: dir.sub("p"), clusterID: cluster, limits: limits)
        for m in TelehealthSchema.migrations { _ = try store.execute(m, lsn: store.appliedLSN.next, term: Term(1)) }
        for chunk in 0..<4 {
            _ = try store.execute(WriteBatch([SQLStatement(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) INSERT INTO patients (id, reference) SELECT ? + i, 'IPP-' || (? + i) FROM n",
                [.integer(Int64(chunk * 50)), .integer(Int64(chunk * 50))])]), lsn: store.appliedLSN.next, term: Term(1))
        }
        let before = try store.stateHash()
        let lsn = store.appliedLSN
        let cases: [(String, String)] = [
            // New rows: their keys alone outgrow the limit.
            ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO patients (id, reference) SELECT 1000 + i, 'IPP-' || (1000 + i) FROM n", "the rows this write changes"),
            // Fewer new rows, with long values: found while the changeset is written.
            ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20) INSERT INTO patients (id, reference) SELECT 1000 + i, printf('%.400c', 'x') || i FROM n", "the batch's changeset"),
            // Changed rows: found too large while their old images are kept.
            ("UPDATE patients SET reference = reference || '-moved'", "the rows this write changes"),
            ("DELETE FROM patients", "the rows this write changes"),
        ]
        for (sql, what) in cases {
            #expect {
                try store.execute(WriteBatch([SQLStatement(sql)]), lsn: lsn.next, term: Term(1))
            } throws: { error in
                guard let e = error as? StoreError else { return false }
                return e.code == "too_large" && e.description.contains(what)
            }
            #expect(store.appliedLSN == lsn)
        }
        #expect(try store.stateHash() == before)
        // Within the limit, the same kind of write goes through.
        _ = try store.execute(WriteBatch([SQLStatement("UPDATE patients SET reference = reference || '-x' WHERE id <= 20")]), lsn: lsn.next, term: Term(1))
    }
}

/// A primary store with the telehealth schema and every record it logged, schema first,
/// for replicas to apply.
final class LoggedPrimary {
    let store: StateStore
    var records: [LogRecord]

    init(_ directory: String) throws {
        store = try telehealthStore(directory)
        records = TelehealthSchema.migrations.enumerated().map { i, m in
            LogRecord(term: Term(1), lsn: LSN(UInt64(i + 1)), kind: .schema, payload: SchemaPayload.encode(m))
        }
    }

    /// Executes one batch of `sql` and keeps its record.
    func run(_ sql: [String]) throws {
        let e = try store.execute(WriteBatch(sql.map { SQLStatement($0) }), lsn: store.appliedLSN.next, term: Term(1))
        records.append(e.record)
    }
}
